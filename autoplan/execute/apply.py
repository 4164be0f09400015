"""Apply a plan to a model on this rank: validate, split into pipeline stages, then on each local stage tensor
parallelism → recompute → data parallelism (the torchtitan order), then the pipeline schedule.

Everything that can fail on the plan or the model (mismatches, tracing for the pipeline split) is checked before the
model is changed, so a failure leaves the model as it was.

Example (a world of one: no process group, the model trains as is):
    >>> import torch, autoplan
    >>> from autoplan.execute.apply import apply_plan
    >>> from autoplan.execute.manual import manual_plan
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> applied = apply_plan(model, manual_plan(model, [["0"]], global_batch_size=2))
    >>> applied.stages[0].index, applied.schedule is None
    (0, True)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..plan import Plan
from .data_parallel import apply_data_parallel, low_precision_dtype
from .mesh import build_mesh, mesh_coordinates
from .pipeline import TiedGradientGroup, build_schedule, local_stage_indices, tied_gradient_groups
from .recompute import apply_recompute
from ..trace.stages import split_into_stages
from .tensor_parallel import apply_tensor_parallel, tied_parameter_names
from .validate import check_plan_matches
from .world import World

__all__ = ["LocalStage", "AppliedPlan", "apply_plan"]

log = logging.getLogger("autoplan")


@dataclass
class LocalStage:
    """A pipeline stage held by this rank: ``module`` has the original FQNs; ``runner`` is what gets called (the
    DDP wrapper around ``module``, or ``module`` itself)."""

    index: int
    module: nn.Module
    runner: nn.Module


@dataclass
class AppliedPlan:
    """Everything :class:`ParallelModel` needs at run time."""

    plan: Plan
    world: World
    device: torch.device
    coords: dict[str, int]
    stages: list[LocalStage]
    mesh: DeviceMesh | None = None
    schedule: object | None = None
    tied_groups: list[TiedGradientGroup] = field(default_factory=list)
    state_keys: list[str] = field(default_factory=list)
    autocast_dtype: torch.dtype | None = None  # mixed precision by autocast (DDP and single-device plans)


def _held_styles(root: nn.Module, styles: dict[str, str]) -> dict[str, str]:
    held = {}
    for fqn, style in styles.items():
        try:
            root.get_submodule(fqn)
        except AttributeError:
            continue
        held[fqn] = style
    return held


def _info(world: World, message: str, *args) -> None:
    if world.rank == 0:
        log.info("autoplan: " + message, *args)


def apply_plan(model: nn.Module, plan: Plan, loss_fn=None) -> AppliedPlan:
    """Change ``model`` in place (and split it) to run ``plan`` on this rank. ``loss_fn`` is needed when the plan
    pipelines (the last stage computes the loss).

    Example: see the module docstring.
    """
    from .batch import default_loss

    world = World.current()
    check_plan_matches(plan, model, world.size)
    kind = plan.cluster.device.kind
    device = world.device(kind)
    state_keys = list(model.state_dict().keys())
    tied = tied_parameter_names(model)
    m = plan.mesh
    parts = split_into_stages(model, [s.layers for s in plan.stages]) if m.pp > 1 else [model]

    world.init_process_group(kind)
    world = World.current()
    mesh = build_mesh(m, kind) if world.distributed else None
    coords = mesh_coordinates(m, world.rank)
    model.to(device)
    if m.pp > 1:
        for part in parts:  # a stage may hold root-level constants of its own (fx get_attr targets)
            part.to(device)

    indices = local_stage_indices(len(plan.stages), m.pp, coords["pp"]) if m.pp > 1 else [0]
    stages: list[LocalStage] = []
    counts = {"tp": 0, "recompute": 0}
    for k in indices:
        root = parts[k]
        if m.tp > 1:
            counts["tp"] += apply_tensor_parallel(root, _held_styles(root, plan.tensor_parallel), mesh["tp"])
        recompute = plan.stages[k].recompute if m.pp > 1 else plan.recompute
        counts["recompute"] += apply_recompute(root, recompute)
        runner = root
        if m.dp > 1 and any(p.requires_grad for p in root.parameters()):
            layers = plan.stages[k].layers if m.pp > 1 else plan.layers
            runner = apply_data_parallel(root, plan.data_parallel, mesh["dp"], layers, plan.precision,
                                         composed=m.tp > 1 or m.pp > 1)
        stages.append(LocalStage(k, root, runner))
    if m.tp > 1:
        _info(world, "applied tensor parallel (tp=%d) to %d modules", m.tp, counts["tp"])
    if counts["recompute"]:
        _info(world, "applied activation recompute to %d modules", counts["recompute"])
    if m.dp > 1:
        _info(world, "applied %s (dp=%d) to %d stage module(s) per rank", plan.data_parallel.upper(), m.dp,
              len(stages))

    schedule = None
    tied_groups: list[TiedGradientGroup] = []
    if m.pp > 1:
        schedule = build_schedule(plan, [(s.index, s.runner) for s in stages], mesh["pp"].get_group(), device,
                                  loss_fn or default_loss)
        tied_groups = tied_gradient_groups(plan, tied, world.rank)
        _info(world, "applied pipeline parallel (pp=%d, %s, %d stages, %d microbatches)", m.pp, plan.schedule,
              len(plan.stages), plan.microbatches)
    # FSDP2 and replicate() take a MixedPrecisionPolicy; the rest computes under autocast.
    uses_autocast = m.dp == 1 or (plan.data_parallel == "ddp" and m.tp == 1 and m.pp == 1)
    return AppliedPlan(
        plan=plan, world=world, device=device, coords=coords, stages=stages, mesh=mesh, schedule=schedule,
        tied_groups=tied_groups, state_keys=state_keys,
        autocast_dtype=low_precision_dtype(plan.precision) if uses_autocast else None,
    )
