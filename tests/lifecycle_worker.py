"""One torchrun rank of the model-lifecycle tests: models built on meta, full and safetensors loading, distributed
checkpoints resumed under another layout, and the guards against hangs and silent mistakes.

    python -m torch.distributed.run --nproc_per_node 4 tests/lifecycle_worker.py cases.json OUT_DIR

Each case is {"name", "action", ...}; rank r writes OUT_DIR/rank{r}.pt with {name: result}. A "fail_together" case
shuts the process groups down, so it must come last.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])

import autoplan  # noqa: E402
from autoplan.execute.manual import manual_plan  # noqa: E402
from autoplan.models import GPT  # noqa: E402
from distributed_helpers import GPT_CONFIG, LR, build_model  # noqa: E402
from lifecycle_helpers import SAVE_AT, lifecycle_batches  # noqa: E402


def _parallelize(model, case_plan: dict, **kwargs):
    return autoplan.parallelize(model, plan=manual_plan(model, **case_plan), **kwargs)


def _meta_gpt() -> torch.nn.Module:
    with torch.device("meta"):
        return GPT(GPT_CONFIG)


def _train(pm, opt, batches) -> list[float]:
    losses = []
    for inputs, targets in batches:
        losses.append(pm.train_step(inputs, targets))
        opt.step()
        opt.zero_grad()
    return losses


def meta_init(case: dict) -> dict:
    """Build on meta under a per-rank seed (rank 0's decides), init, train SAVE_AT steps."""
    rank = int(os.environ["RANK"])
    torch.manual_seed(7 if rank == 0 else 1000 + rank)
    pm = _parallelize(_meta_gpt(), case["plan"])
    init = pm.full_state_dict()
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    losses = _train(pm, opt, lifecycle_batches()[:SAVE_AT])
    return {"init": init, "losses": losses, "state": pm.full_state_dict()}


def resume(case: dict) -> dict:
    """Train SAVE_AT steps under layout A (a real model), save; build on meta under layout B, load, train as many
    more."""
    path = os.path.join(case["dir"], case["name"].replace(":", "_"))
    pm = _parallelize(build_model("gpt"), case["a"])
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    losses = _train(pm, opt, lifecycle_batches()[:SAVE_AT])
    pm.save_checkpoint(path, optimizer=opt, extra={"step": SAVE_AT})
    pm_b = _parallelize(_meta_gpt(), case["b"], init_weights=False)
    opt_b = torch.optim.AdamW(pm_b.parameters(), lr=LR)
    extra = pm_b.load_checkpoint(path, optimizer=opt_b)
    losses += _train(pm_b, opt_b, lifecycle_batches()[SAVE_AT:])
    return {"losses": losses, "extra": extra, "state": pm_b.full_state_dict()}


def load_full(case: dict) -> dict:
    """A full state dict (on rank 0 only, or everywhere) and a safetensors file into meta models of two layouts."""
    full = build_model("gpt").state_dict()
    out = {}
    pm = _parallelize(_meta_gpt(), case["a"], init_weights=False)
    pm.load_state_dict(full if dist.get_rank() == 0 else None)
    out["rank0"] = pm.full_state_dict()
    path = os.path.join(case["dir"], "model.safetensors")
    autoplan.save_safetensors(pm, path)
    pm_b = _parallelize(_meta_gpt(), case["b"], init_weights=False)
    autoplan.load_safetensors(pm_b, path)
    out["safetensors"] = pm_b.full_state_dict()
    pm_c = _parallelize(_meta_gpt(), case["b"], init_weights=False)
    pm_c.load_state_dict(full)
    out["everywhere"] = pm_c.full_state_dict()
    return out


def _error_of(fn) -> str | None:
    try:
        fn()
    except Exception as exc:  # the guard's error, by type and message
        return f"{type(exc).__name__}: {exc}"
    return None


def guards(case: dict) -> dict:
    """Errors that must fail alike on every rank, with autoplan's sentence."""
    out = {}
    plan = case["plan"]
    model = build_model("gpt")
    _parallelize(model, plan)
    out["twice"] = _error_of(lambda: _parallelize(model, plan))

    model = build_model("gpt")
    stale = torch.optim.AdamW(model.parameters(), lr=LR)
    pm = _parallelize(model, plan)
    inputs, targets = lifecycle_batches()[0]
    pm.train_step(inputs, targets)
    out["stale_optimizer"] = _error_of(stale.step)

    torch.manual_seed(dist.get_rank())  # every rank its own weights
    from autoplan.models import GPT as Model

    model = Model(GPT_CONFIG)
    rank0 = {k: v.clone() for k, v in model.state_dict().items()}
    box = [rank0]
    dist.broadcast_object_list(box, src=0)
    pm = _parallelize(model, plan)
    state = pm.full_state_dict()
    if dist.get_rank() == 0:
        out["seeds_agree"] = all(torch.equal(state[k], box[0][k]) for k in state)

    bn = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 16))
    out["batch_norm"] = _error_of(lambda: autoplan.parallelize(
        bn, plan=manual_plan(bn, [["0", "1", "2"]], dp=4, global_batch_size=16)))

    class Unused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    pm = autoplan.parallelize(model, plan=manual_plan(model, [["used", "spare"]], dp=4, global_batch_size=16))
    out["ddp_unused"] = _error_of(lambda: pm.train_step(torch.randn(16, 16), torch.randn(16, 16)))
    model = Unused()
    pm = autoplan.parallelize(model, plan=manual_plan(model, [["used", "spare"]], dp=4, global_batch_size=16,
                                                       data_parallel="fsdp"))
    out["fsdp_unused"] = _error_of(lambda: pm.train_step(torch.randn(16, 16), torch.randn(16, 16)))
    return out


def fail_together(case: dict) -> dict:
    """One rank's loss raises mid-step (the others wait in the pipeline); every rank must raise its error."""
    def loss_fn(outputs, targets):
        if dist.get_rank() == case["failing_rank"]:
            raise ValueError("the loss of this rank is broken")
        return torch.nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))

    model = build_model("gpt")
    pm = autoplan.parallelize(model, plan=manual_plan(model, **case["plan"]), loss_fn=loss_fn)
    inputs, targets = lifecycle_batches()[0]
    start = time.monotonic()
    error = _error_of(lambda: pm.train_step(inputs, targets))
    return {"error": error, "seconds": time.monotonic() - start}


def fail_in_apply(case: dict) -> dict:
    """One rank's init_weights raises while the plan is applied (the others finish their part first); every rank
    must raise its error from parallelize."""
    def init_weights(module):
        if int(os.environ["RANK"]) == case["failing_rank"] and isinstance(module, torch.nn.LayerNorm):
            raise ValueError("this rank cannot initialize LayerNorm")
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()

    start = time.monotonic()
    error = _error_of(lambda: _parallelize(_meta_gpt(), case["plan"], init_weights=init_weights))
    return {"error": error, "seconds": time.monotonic() - start}


ACTIONS = {"meta_init": meta_init, "resume": resume, "load_full": load_full, "guards": guards,
           "fail_together": fail_together, "fail_in_apply": fail_in_apply}


def main(spec: str, out_dir: str) -> None:
    cases = json.loads(open(spec).read())
    results = {}
    for case in cases:
        try:
            results[case["name"]] = ACTIONS[case["action"]](case)
        except Exception:
            print(f"rank {os.environ['RANK']}: {case['name']} failed\n{traceback.format_exc()}", file=sys.stderr,
                  flush=True)
            os._exit(1)
    torch.save(results, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
