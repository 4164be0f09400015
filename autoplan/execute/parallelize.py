"""``autoplan.parallelize``: plan (on rank 0, broadcast) or load a plan, check it against the model and the job,
and apply it.

Example (a world of one; under torchrun the same call runs on every rank):
    >>> import torch, autoplan
    >>> from autoplan.models import MLP
    >>> from autoplan.execute.manual import manual_plan
    >>> model = MLP(8, 16, depth=2)
    >>> pm = autoplan.parallelize(model, plan=manual_plan(model, [[""]], global_batch_size=4))
    >>> pm.plan.mesh.world_size
    1
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from .. import errors
from ..cluster import Cluster
from ..plan import Plan
from .apply import AppliedPlan, apply_plan
from .batch import as_args, checked_loss
from .guards import check_not_parallelized
from .parallel_model import ParallelModel
from ..trace.stages import pipeline_split_blocker
from .world import World

log = logging.getLogger("autoplan")

__all__ = ["parallelize"]


def _plan_everywhere(model: nn.Module, example_inputs: tuple, cluster: Cluster | None, plan_kwargs: dict,
                     timeout_s: float | None = None) -> Plan:
    """Plan on rank 0 and broadcast the JSON; an error on rank 0 is raised on every rank (no rank hangs)."""
    from ..api import plan as make_plan

    cluster = cluster or Cluster.detect()
    if cluster.device.kind == "cpu":
        plan_kwargs = {"precision": "fp32", **plan_kwargs}
    # A model the executor cannot split is planned without pipeline stages: tracing records why
    # (graph.pipeline_blocker, the executor's own check) and the search keeps pp = 1, saying so in plan.search.notes.
    world = World.current()
    payload: dict[str, Any] = {}

    def plan_here() -> None:
        try:
            inputs = example_inputs[0] if len(example_inputs) == 1 else example_inputs
            payload["plan"] = json.dumps(make_plan(model, inputs, cluster=cluster, **plan_kwargs).to_dict())
        except Exception as exc:
            if not world.distributed:
                raise
            payload["error"] = (type(exc).__name__, str(exc))

    # Rank 0 plans before the process group exists when it can: the trace-time check of a tensor-parallel group's
    # DTensor form makes a process group of its own (autoplan.trace.tp_check_global), which it cannot inside one.
    # The other ranks wait for it in init_process_group.
    before = world.rank == 0 and not (dist.is_available() and dist.is_initialized())
    if before:
        plan_here()
    world.init_process_group(cluster.device.kind, timeout_s)
    world = World.current()
    if world.rank == 0 and not before:
        plan_here()
    if world.distributed:
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        payload = box[0]
    if "error" in payload:
        name, message = payload["error"]
        kind = getattr(errors, name, None)
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            kind = ValueError if name == "ValueError" else RuntimeError
        raise kind(f"planning on rank 0 failed: {message}")
    return Plan.from_dict(json.loads(payload["plan"]))


def parallelize(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    loss_fn: Callable | None = None,
    plan: Plan | str | Path | None = None,
    cluster: Cluster | None = None,
    init_weights: Callable | bool | None = None,
    timeout: float | None = None,
    **plan_kwargs: Any,
) -> ParallelModel:
    """Apply a plan to ``model`` on this rank and return a :class:`ParallelModel`. Call it on every rank.

    - ``plan`` (a Plan or the path of its JSON) is applied as is (a pipelined plan for a model torch.fx cannot
      trace, such as a transformers model, builds its stages from ``example_inputs``, or from the first batch when
      none are given: :mod:`autoplan.trace.skeleton`). Otherwise rank 0 runs
      ``autoplan.plan(model, example_inputs, cluster=cluster or Cluster.detect(), **plan_kwargs)`` and broadcasts
      the plan; on a CPU cluster ``precision`` defaults to ``"fp32"``.
    - ``example_inputs`` is the GLOBAL batch the model trains on (dim 0 of every input is the batch). When it is
      ``None`` and no plan is given, planning and applying wait for the first ``train_step``/``evaluate``/call,
      whose inputs serve as the example.
    - Under torchrun the default process group is created if needed (gloo for CPU plans, nccl for CUDA plans;
      rank 0 plans before creating it, so that the trace-time check can use a process group of its own);
      a single process without torchrun is a world of one and needs none.
    - The plan is checked first: another model's fingerprint, another world size, or modules the model lacks raise
      :class:`autoplan.PlanMismatchError` before anything is changed. The model is then changed in place (tensor
      parallel shards, FSDP, recompute); use the returned ParallelModel, not the model. A model that is already
      parallelized (by autoplan, FSDP, DDP or DTensor) is refused.
    - A model built on the meta device (``with torch.device("meta"): model = build()``) is allocated on each rank
      only where it holds it (its pipeline stages, its tensor-parallel and FSDP shards), then initialized by
      ``init_weights(module)`` for every module (default: ``module.reset_parameters()``) — identically on every
      rank whatever its seed; ``init_weights=False`` leaves it to ``pm.load_state_dict`` / ``pm.load_checkpoint``.
      See :mod:`autoplan.execute.materialize`. A real model built with different weights on different ranks gets
      rank 0's.
    - ``timeout`` (seconds): how long a collective waits for a stalled rank before every rank raises (applies when
      parallelize creates the process group). An error on one rank while applying or in a step makes every rank
      raise that rank's error (see :mod:`autoplan.execute.guards`).

    Example: see the module docstring; under torchrun ``autoplan.parallelize(model, (tokens,), mesh={"tp": 2})``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    loss_fn = checked_loss(loss_fn)  # one checked loss for every path, the pipeline's last stage included
    if plan is not None:
        if plan_kwargs or cluster is not None:
            given = sorted(plan_kwargs) + (["cluster"] if cluster is not None else [])
            raise ValueError(
                f"planning arguments {given} were given along with plan=; they would be ignored. Pass either a plan "
                f"or the arguments to plan with"
            )
        if isinstance(plan, (str, Path)):
            plan = Plan.load(plan)
        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be an autoplan.Plan or the path of a plan JSON, got {type(plan).__name__}")
        fixed = plan
        if example_inputs is None and fixed.mesh.pp > 1 and pipeline_split_blocker(model, fixed.layers) is not None:
            # torch.fx cannot split this model: its skeleton stages are built from the first batch's inputs
            return ParallelModel(loss_fn, pending=lambda inputs: apply_plan(model, fixed, loss_fn, init_weights,
                                                                            timeout, example_inputs=inputs))
        inputs = as_args(example_inputs) if example_inputs is not None else None
        return ParallelModel(loss_fn, applied=apply_plan(model, plan, loss_fn, init_weights, timeout,
                                                         example_inputs=inputs))

    check_not_parallelized(model)

    def plan_and_apply(inputs: tuple) -> AppliedPlan:
        plan = _plan_everywhere(model, inputs, cluster, dict(plan_kwargs), timeout)
        return apply_plan(model, plan, loss_fn, init_weights, timeout, example_inputs=inputs)

    if example_inputs is None:
        return ParallelModel(loss_fn, pending=plan_and_apply)
    return ParallelModel(loss_fn, applied=plan_and_apply(as_args(example_inputs)))
