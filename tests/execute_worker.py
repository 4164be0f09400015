"""One torchrun rank of the executor numerics tests: run every case of a JSON file, write rank 0's results.

    python -m torch.distributed.run --nproc_per_node 4 tests/execute_worker.py cases.json results.pt
"""

from __future__ import annotations

import json
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])

import autoplan  # noqa: E402
from autoplan.execute.manual import manual_plan  # noqa: E402
from distributed_helpers import LR, batches, build_model  # noqa: E402


def run_case(case: dict) -> dict:
    model = build_model(case["kind"])
    plan = manual_plan(model, **case["plan"])
    pm = autoplan.parallelize(model, plan=plan)
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    losses = []
    for inputs, targets in batches(case["kind"]):
        losses.append(pm.train_step(inputs, targets))
        opt.step()
        opt.zero_grad()
    return {"losses": losses, "state": pm.full_state_dict()}


def main(spec: str, out: str) -> None:
    cases = json.loads(open(spec).read())
    results = {}
    for case in cases:
        try:
            results[case["name"]] = run_case(case)
        except Exception:
            results[case["name"]] = {"error": traceback.format_exc()}
            print(f"rank {dist.get_rank() if dist.is_initialized() else 0}: {case['name']} failed\n"
                  + results[case["name"]]["error"], file=sys.stderr, flush=True)
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(results, out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
