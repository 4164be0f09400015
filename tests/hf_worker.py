"""One torchrun rank of the Hugging Face family matrix: for each (family, mesh) case, train the family's toy model
under an automatic plan pinned to that mesh and compare with one process; rank 0 writes the results.

    python -m torch.distributed.run --nproc_per_node 4 tests/hf_worker.py cases.json results.pt

Before the first case the ranks share out the families: each traces its families once, plans their cases and
trains their one-process references (toy models: milliseconds), so the comparison needs no second launch and
tracing runs on every core. Dropout is switched off in both runs so that they may agree to float rounding.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])

import autoplan  # noqa: E402
import models_hf  # noqa: E402
from distributed_helpers import serve_cases, train_one_process, train_parallel  # noqa: E402

GLOBAL_BATCH, STEPS, LR = 8, 2, 1e-3
#: rank 0's seed for the cases that build their model on meta (``init_on_meta``)
META_SEED = 7


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off everywhere: nn.Dropout modules and the float rates attention code reads from attributes."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "drop" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(1234)
    model, _ = (models_hf.FAMILIES.get(family) or getattr(models_hf, family))()  # fused_qkv_gpt, phi3_mha: extras
    return no_dropout(model)


def batches(family: str) -> list[tuple[tuple, torch.Tensor]]:
    """Positional inputs (in forward's order) and targets, the same on every rank."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        if family == "vit":
            out.append(((torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g),),
                        torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)))
            continue
        ids = torch.randint(0, models_hf.VOCAB, (GLOBAL_BATCH, models_hf.SEQ + 1), generator=g)
        if family in ("t5", "bart"):  # (input_ids, attention_mask, decoder_input_ids)
            out.append(((ids[:, :-1], None, ids[:, :-1].flip(1).contiguous()), ids[:, 1:]))
        else:
            out.append(((ids[:, :-1],), ids[:, 1:]))
    return out


def loss_fn(outputs, targets: torch.Tensor) -> torch.Tensor:
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def reference(family: str) -> dict:
    losses, state = train_one_process(build(family), batches(family), lr=LR, loss_fn=loss_fn)
    return {"losses": losses, "state": state}


def _plan_case(graph, case: dict) -> dict:
    """What ``autoplan.parallelize(model, inputs, mesh=..., precision="fp32")`` plans on rank 0 and broadcasts, from
    the family's one trace; pinned stage boundaries where the case names cuts."""
    from autoplan.options import PlanOptions
    from autoplan.solve import search

    cluster = autoplan.Cluster.preset("cpu", devices_per_node=int(os.environ["WORLD_SIZE"]))
    options = PlanOptions(mesh=case["mesh"], precision="fp32", data_parallel=case.get("data_parallel", "auto"),
                          sequence_parallel=case.get("sequence_parallel", "auto"))
    plan = search(graph, cluster, options).to_dict()
    if "cuts" in case:  # pinned stage boundaries, two stages per pipeline rank under the interleaved schedule
        layers = [name for stage in plan["stages"] for name in stage["layers"]]
        bounds = [0, *case["cuts"], len(layers)]
        plan["stages"] = [{"layers": layers[a:b], "recompute": []} for a, b in zip(bounds, bounds[1:])]
        plan.update(schedule="interleaved", virtual_stages=(len(bounds) - 1) // case["mesh"]["pp"],
                    microbatches=2, microbatch_size=plan["global_batch_size"] // case["mesh"].get("dp", 1) // 2)
    return plan


def prepare(cases: list[dict]) -> tuple[dict, dict]:
    """Every case's plan (on every rank) and every family's one-process reference (on rank 0), before the first
    case. Tracing is the world's largest cost and planning needs no process group, so the families are shared out:
    rank r traces families r, r + world size, … once each, plans their cases and trains their references; the
    plans are then exchanged. A failure on any rank stops every rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    families = list(dict.fromkeys(case["family"] for case in cases))
    plans, references, error = {}, {}, None
    try:
        for family in families[rank::size]:
            graph = autoplan.trace(build(family), batches(family)[0][0])
            plans.update({case_name(c): _plan_case(graph, c) for c in cases if c["family"] == family})
            references[family] = reference(family)
    except Exception:
        import traceback

        error = f"rank {rank}: preparing {family} failed\n{traceback.format_exc()}"
    gathered = [None] * size
    dist.all_gather_object(gathered, (plans, error))
    errors = [e for _, e in gathered if e]
    if errors:
        print("\n".join(errors), file=sys.stderr, flush=True)
        os._exit(1)
    out = [None] * size if rank == 0 else None
    dist.gather_object(references, out, dst=0)
    all_plans = {name: plan for part, _ in gathered for name, plan in part.items()}
    return all_plans, ({k: v for part in out for k, v in part.items()} if rank == 0 else {})


def run_case(case: dict, plans: dict, references: dict) -> dict:
    family = case["family"]
    data = batches(family)
    plan = autoplan.Plan.from_dict(plans[case_name(case)])
    if case.get("init_on_meta"):  # built on meta: each rank initializes its shards; rank 0 returns the whole
        model, _ = (models_hf.FAMILIES.get(family) or getattr(models_hf, family))(device="meta")
        torch.manual_seed(META_SEED)
        pm = autoplan.parallelize(model, data[0][0], loss_fn=loss_fn, plan=plan)
        return {"init": pm.full_state_dict(), "plan": pm.plan.to_dict()}
    model = build(family)
    pm = autoplan.parallelize(model, data[0][0], loss_fn=loss_fn, plan=plan)
    opt, losses, state = train_parallel(pm, data)
    result = {"losses": losses, "plan": pm.plan.to_dict(), "sharded": len(pm.plan.tensor_parallel),
              "notes": list(pm.plan.search.notes)}
    if case.get("checkpoint"):
        result["roundtrip"] = roundtrip(pm, opt, data, state, case["checkpoint"])
    if state:  # rank 0
        ref = references[family]
        result["ref_losses"] = ref["losses"]
        diffs = {k: (state[k].float() - v.float()).abs().max().item() for k, v in ref["state"].items() if k in state}
        result["missing"] = sorted(set(ref["state"]) - set(state))
        result["max_weight_diff"] = max(diffs.values())
        result["worst_weight"] = max(diffs, key=diffs.get)
    return result


def roundtrip(pm, opt, data, state: dict, path: str) -> dict:
    """Save a DCP checkpoint, train on, load it back; train on, load ``state`` (full tensors, rank 0 only) back.
    Returns, on rank 0, the largest difference of each reload from ``state`` and the checkpoint's own tensors
    read whole (``dcp_to_torch_save``): fused projections must come back, and be stored, in their original order."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    def step():
        pm.train_step(*data[0])
        opt.step()
        opt.zero_grad()

    def worst(got: dict) -> float:
        return max((got[k].float() - v.float()).abs().max().item() for k, v in state.items()) if got else 0.0

    pm.save_checkpoint(path, optimizer=opt)
    step()
    pm.load_checkpoint(path, optimizer=opt)
    after_checkpoint = worst(pm.full_state_dict())
    step()
    pm.load_state_dict(state if state else None)
    after_state_dict = worst(pm.full_state_dict())
    if not state:
        return {}
    dcp_to_torch_save(path, path + ".pt")
    stored = torch.load(path + ".pt", weights_only=False)
    on_disk = worst({k: stored[f"model.{k}"] for k in state})
    return {"checkpoint": after_checkpoint, "state_dict": after_state_dict, "on_disk": on_disk}


def case_name(case: dict) -> str:
    kind = f":{case['data_parallel']}" if "data_parallel" in case else ""
    kind += ":sp" if case.get("sequence_parallel") is True else ""
    kind += ":cuts" + ",".join(map(str, case["cuts"])) if "cuts" in case else ""
    kind += ":meta" if case.get("init_on_meta") else ""
    return f"{case['family']}:{'x'.join(f'{k}{v}' for k, v in case['mesh'].items())}{kind}"


def main(spec: str, out: str) -> None:
    import json

    plans, references = prepare(json.loads(open(spec).read()))
    serve_cases(spec, out, lambda case: run_case(case, plans, references), case_name)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
