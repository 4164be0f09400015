"""One torchrun rank of the collective-count tests: for every case, what this rank issues in one training step
(counted by tests/comm_counter.py) beside what the cost model charges (autoplan.cost.traffic.plan_collectives).
A case with ``"numerics": true`` first trains the reference's AdamW steps and returns their losses and the final
full state dict, for the parent to compare with one process. Kinds ``gqa`` and ``gqa-nobias`` are
tests/models_gqa.py's model (a fused qkv of unequal parts), the others distributed_helpers' models.

    python -m torch.distributed.run --nproc_per_node 2 tests/collective_worker.py cases.json results.pt
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, __file__.rsplit("/", 1)[0])

import autoplan  # noqa: E402
from autoplan.cost.traffic import plan_collectives  # noqa: E402
from autoplan.execute.manual import manual_plan  # noqa: E402
from comm_counter import counted_collectives  # noqa: E402
from distributed_helpers import GLOBAL_BATCH, STEPS, batches, build_model, train_parallel  # noqa: E402
from models_gqa import build_gqa, gqa_batches  # noqa: E402


_GRAPHS: dict[str, autoplan.ModelGraph] = {}


def _model(kind: str) -> torch.nn.Module:
    return build_gqa(kind) if kind.startswith("gqa") else build_model(kind)


def _batches(kind: str) -> list:
    return gqa_batches(GLOBAL_BATCH, STEPS) if kind.startswith("gqa") else batches(kind)


def _gathers(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an FSDP unit that gathers parameters of its own (not all held by units inside it)."""
    if not isinstance(module, FSDPModule):
        return False
    inner = {id(p) for m in module.modules() if m is not module and isinstance(m, FSDPModule) for p in m.parameters()}
    return any(id(p) not in inner for p in module.parameters())


def run_case(case: dict) -> dict:
    model = _model(case["kind"])
    inputs, targets = _batches(case["kind"])[0]
    args = dict(case["plan"])
    reshard = args.pop("fsdp_reshard", "step")  # a plan field manual_plan leaves at its default
    plan = manual_plan(model, **args).replace(fsdp_reshard=reshard)
    if case["kind"] not in _GRAPHS:  # every case of a kind traces the same model and batch: once per rank
        _GRAPHS[case["kind"]] = autoplan.trace(_model(case["kind"]), (inputs,))
    graph = _GRAPHS[case["kind"]]
    pm = autoplan.parallelize(model, plan=plan)
    numerics = {}
    if case.get("numerics"):  # the reference's steps: also the warm-up
        _, losses, state = train_parallel(pm, _batches(case["kind"]))
        numerics = {"losses": losses, "state": state}
    else:  # warm-up: DDP rebuilds its buckets at the first forward after its first synced backward, in the second
        for _ in range(2):  # step, and broadcasts their indices from rank 0 then, once
            pm.train_step(inputs, targets)
    if plan.sequence_parallel:  # as after opt.zero_grad(): a norm's partial gradient is reduced once per step
        for p in pm.parameters():
            p.grad = None
    with counted_collectives() as issued:
        pm.train_step(inputs, targets)
    coords = pm._ready().coords
    units = sum(_gathers(m) for root in pm.modules_on_rank for m in root.modules())
    charged = plan_collectives(graph, plan)[coords["pp"]]
    return {"rank": dist.get_rank(), "coords": dict(coords), "units": units,
            "issued": [(c.kind, c.nbytes) for c in issued],
            "charged": [(c.kind, c.nbytes, c.count, c.axis) for c in charged], **numerics}


def main(spec: str, out: str) -> None:
    cases = json.loads(open(spec).read())
    dist.init_process_group("gloo")
    results = {}
    for case in cases:
        try:
            mine = run_case(case)
        except Exception:
            print(f"rank {dist.get_rank()}: {case['name']} failed\n{traceback.format_exc()}", file=sys.stderr,
                  flush=True)
            os._exit(1)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        results[case["name"]] = gathered
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
