"""One torchrun rank of the executor numerics tests: run every case of a JSON file, write rank 0's results.

    python -m torch.distributed.run --nproc_per_node 4 tests/execute_worker.py cases.json results.pt
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])

import autoplan  # noqa: E402
from autoplan.execute.manual import manual_plan  # noqa: E402
from autoplan.execute.recompute import is_recomputed  # noqa: E402
from distributed_helpers import LR, batches, build_model, serve_cases  # noqa: E402


def parallelize(case: dict, model: torch.nn.Module, first_inputs: torch.Tensor):
    if "plan" in case:
        return autoplan.parallelize(model, plan=manual_plan(model, **case["plan"]))
    cluster = autoplan.Cluster.preset("cpu", devices_per_node=int(os.environ["WORLD_SIZE"]))
    example = None if case.get("lazy") else first_inputs
    return autoplan.parallelize(model, example, cluster=cluster, **case["auto"])


def recomputed(model: torch.nn.Module) -> list[str]:
    """The modules recomputed on any rank (a pipeline rank holds its stages' only), sorted."""
    import torch.distributed as dist

    names = [[n for n, m in model.named_modules() if is_recomputed(m)]]
    if dist.is_initialized():
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, [n for n, m in model.named_modules() if is_recomputed(m)])
    return sorted(set(sum(names, [])))


def run_example(case: dict) -> dict:
    """Run an example script as torchrun would (``__main__``) in this world, and return what it printed. The
    examples shut the process group down when they finish, so such a case comes last."""
    import contextlib
    import io
    import runpy

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(case["example"], run_name="__main__")
    return {"stdout": out.getvalue()}


def run_case(case: dict) -> dict:
    if "example" in case:
        return run_example(case)
    model = build_model(case["kind"])
    data = batches(case["kind"])
    if "expect_error" in case:
        try:
            parallelize(case, model, data[0][0])
        except Exception as exc:  # every rank fails the same way before any collective
            return {"error_type": type(exc).__name__, "message": str(exc)}
        return {"error_type": None}
    pm = parallelize(case, model, data[0][0])
    # A lazily planned model has its parameters only after the first step: build the optimizer then.
    opt = None if case.get("lazy") else torch.optim.AdamW(pm.parameters(), lr=LR)
    losses = []
    for inputs, targets in data:
        losses.append(pm.train_step(inputs, targets))
        opt = opt or torch.optim.AdamW(pm.parameters(), lr=LR)
        opt.step()
        opt.zero_grad()
    inputs, targets = data[0]
    result = {"losses": losses, "eval_loss": pm.evaluate(inputs, targets), "state": pm.full_state_dict(),
              "plan": pm.plan.to_dict(), "recomputed": recomputed(model)}
    if pm.plan.mesh.pp == 1:
        with torch.no_grad():
            result["outputs"] = pm(inputs).detach().cpu()
    return result


def main(spec: str, out: str) -> None:
    serve_cases(spec, out, run_case)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
