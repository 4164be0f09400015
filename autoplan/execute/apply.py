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

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..plan import Plan
from .data_parallel import apply_data_parallel, low_precision_dtype
from .experts import apply_expert_parallel, check_expert_parallel
from .guards import (agree_on_initial_weights, check_batch_norm, check_not_parallelized, fail_together,
                     mark_parallelized, watch_replaced_parameters)
from .materialize import check_loadable, held_tensors, init_weights_by_module, on_meta, retie, shared_seed
from .mesh import build_mesh, mesh_coordinates
from .pipeline import TiedGradientGroup, build_schedule, local_stage_indices, tied_gradient_groups
from .recompute import apply_recompute
from ..trace.adapters import trace_kwargs
from ..trace.skeleton import stands_in
from ..trace.stages import split_into_stages
from .tensor_parallel import apply_tensor_parallel, check_stage_outputs_whole, tied_parameter_names
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
    tied: list[list[str]] = field(default_factory=list)  # names of each weight tied in the original model
    inputs_to_every_stage: bool = False  # skeleton stages: every stage takes the microbatch's model inputs
    uninitialized: bool = False  # built on meta with init_weights=False: load a state dict or checkpoint first
    # keyword inputs a training or evaluation step adds to the model's unless given (use_cache=False: the trace ran
    # so, autoplan.trace.adapters), where the model's own forward takes the microbatch
    step_kwargs: dict = field(default_factory=dict)


def _held_styles(root: nn.Module, styles: dict[str, str]) -> dict[str, str]:
    # registered modules only: a skeleton stage's stand-ins answer attribute reads for the layers they replace
    held = {name for name, module in root.named_modules() if not stands_in(module)}
    return {fqn: style for fqn, style in styles.items() if fqn in held}


def _on_rebuilt(loss_fn: Callable, rebuild: Callable) -> Callable:
    def loss(output, target):
        return loss_fn(rebuild(output), target)

    return loss


def _info(world: World, message: str, *args) -> None:
    if world.rank == 0:
        log.info("autoplan: " + message, *args)


def apply_plan(model: nn.Module, plan: Plan, loss_fn=None, init_weights: Callable | bool | None = None,
               timeout_s: float | None = None, example_inputs: Any = None) -> AppliedPlan:
    """Change ``model`` in place (and split it) to run ``plan`` on this rank. ``loss_fn`` is needed when the plan
    pipelines (the last stage computes the loss). A model on meta is allocated stage by stage, shard by shard, and
    initialized with ``init_weights`` (see :mod:`autoplan.execute.materialize`). ``timeout_s``: the process
    group's collective timeout when this call creates it. ``example_inputs`` (the forms :func:`autoplan.plan`
    takes) let a pipelined plan split a model torch.fx cannot trace (see :mod:`autoplan.trace.skeleton`).

    Example: see the module docstring.
    """
    world = World.current()
    check_not_parallelized(model)
    step_kwargs = trace_kwargs(model, {})
    check_plan_matches(plan, model, world.size)
    check_expert_parallel(model, plan)
    if init_weights is not None and init_weights is not False and not callable(init_weights):
        raise ValueError(f"init_weights must be a function of a module, None (reset_parameters()) or False (load "
                         f"a state dict or checkpoint next), got {init_weights!r}")
    meta = on_meta(model)
    if meta and init_weights is False:
        check_loadable(model)
    sync_batch_norm = check_batch_norm(model, plan.mesh.dp, plan.microbatches, plan.cluster.device.kind)
    # the group first: a split that needs the cut proof runs it once, on rank 0, and every rank gets its verdict
    world.init_process_group(plan.cluster.device.kind, timeout_s)
    parts = [model]
    if plan.mesh.pp > 1:
        from .batch import Inputs

        given = Inputs.of(example_inputs) if example_inputs is not None else None
        inputs = (given.args, given.kwargs) if given is not None else None
        parts = split_into_stages(model, [s.layers for s in plan.stages], inputs)
    with fail_together("autoplan.parallelize"):
        applied = _apply(model, parts, plan, loss_fn, init_weights, meta, sync_batch_norm)
    applied.inputs_to_every_stage = any(getattr(part, "takes_model_inputs", False) for part in parts)
    if plan.mesh.pp == 1 or applied.inputs_to_every_stage:
        applied.step_kwargs = step_kwargs
    mark_parallelized(model)
    return applied


def _apply(model: nn.Module, parts: list[nn.Module], plan: Plan, loss_fn, init_weights, meta: bool,
           sync_batch_norm: bool) -> AppliedPlan:
    from .batch import default_loss

    world = World.current()
    kind = plan.cluster.device.kind
    device = world.device(kind)
    state_keys = list(model.state_dict().keys())
    tied = tied_parameter_names(model)
    before = list(model.named_parameters(remove_duplicate=False))
    m = plan.mesh
    # An untouched meta copy: init_weights runs on full-size copies of one module at a time (no memory).
    reference = copy.deepcopy(model) if meta and init_weights is not False else None
    mesh = build_mesh(m, kind) if world.distributed else None
    coords = mesh_coordinates(m, world.rank)
    seed = shared_seed(world.distributed) if reference is not None else 0
    if sync_batch_norm:  # pp = 1 here (one microbatch): parts == [model]
        nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=mesh["dp"].get_group())
        _info(world, "converted batch normalization to SyncBatchNorm over the data-parallel ranks")
    if not meta:
        model.to(device)
        if m.pp > 1:
            for part in parts:  # a stage may hold root-level constants of its own (fx get_attr targets)
                part.to(device)
        if agree_on_initial_weights(model):
            _info(world, "ranks built the model with different weights (per-rank seeds?): rank 0's are used")

    def materialize(root: nn.Module) -> None:
        # This rank's part only: TP and FSDP have already made the parameters shards.
        root.to_empty(device=device)
        retie([root], tied)
        if reference is not None:
            init_weights_by_module(reference, held_tensors([root]), init_weights or None, seed)

    indices = local_stage_indices(len(plan.stages), m.pp, coords["pp"]) if m.pp > 1 else [0]
    stages: list[LocalStage] = []
    counts = {"tp": 0, "recompute": 0, "ep": 0}
    for k in indices:
        root = parts[k]
        if m.tp > 1:
            counts["tp"] += apply_tensor_parallel(root, _held_styles(root, plan.tensor_parallel), mesh["tp"],
                                                  plan.stages[k].layers if m.pp > 1 else plan.layers)
            if m.pp > 1 and plan.sequence_parallel:  # stages exchange whole activations, never a shard
                check_stage_outputs_whole(root, k)
        recompute = plan.stages[k].recompute if m.pp > 1 else plan.recompute
        counts["recompute"] += apply_recompute(root, recompute)
        if plan.expert_parallel > 1:  # before DDP, which must know to leave the experts' weights alone
            counts["ep"] += apply_expert_parallel(root, mesh["dp"], plan.expert_parallel)
        runner = root
        data_parallel = m.dp > 1 and any(p.requires_grad for p in root.parameters())
        classic_ddp = data_parallel and plan.data_parallel == "ddp" and m.tp == 1 and m.pp == 1
        # FSDP and replicate() shard parameters on meta, so allocate after them; classic DDP needs real tensors.
        if meta and (classic_ddp or not data_parallel):
            materialize(root)
        if data_parallel:
            layers = plan.stages[k].layers if m.pp > 1 else plan.layers
            runner = apply_data_parallel(root, plan.data_parallel, mesh["dp"], layers, plan.precision,
                                         composed=m.tp > 1 or m.pp > 1,
                                         keep_weights=plan.fsdp_keeps_weights)
            if meta and not classic_ddp:
                materialize(root)
        stages.append(LocalStage(k, root, runner))
    if m.tp > 1:
        _info(world, "applied tensor parallel (tp=%d) to %d modules", m.tp, counts["tp"])
    if counts["ep"]:
        _info(world, "applied expert parallel (ep=%d) to %d experts modules", plan.expert_parallel, counts["ep"])
    if counts["recompute"]:
        _info(world, "applied activation recompute to %d modules", counts["recompute"])
    if m.dp > 1:
        _info(world, "applied %s (dp=%d) to %d stage module(s) per rank", plan.data_parallel.upper(), m.dp,
              len(stages))

    schedule = None
    tied_groups: list[TiedGradientGroup] = []
    if m.pp > 1:
        loss = loss_fn or default_loss
        rebuild = next((getattr(s.module, "rebuild_output", None) for s in stages
                        if getattr(s.module, "rebuild_output", None)), None)
        if rebuild is not None:  # a skeleton's last stage hands a ModelOutput over as a tuple: the loss gets it back
            loss = _on_rebuilt(loss, rebuild)
        schedule = build_schedule(plan, [(s.index, s.runner) for s in stages], mesh["pp"].get_group(), device, loss)
        tied_groups = tied_gradient_groups(plan, tied, world.rank)
        _info(world, "applied pipeline parallel (pp=%d, %s, %d stages, %d microbatches)", m.pp, plan.schedule,
              len(plan.stages), plan.microbatches)
    watch_replaced_parameters(before, held_tensors([s.module for s in stages]))
    # FSDP2 and replicate() take a MixedPrecisionPolicy; the rest computes under autocast (the plan's one rule,
    # which the cost model prices too).
    uses_autocast = plan.mixed_precision == "autocast"
    return AppliedPlan(
        plan=plan, world=world, device=device, coords=coords, stages=stages, mesh=mesh, schedule=schedule,
        tied_groups=tied_groups, state_keys=state_keys,
        autocast_dtype=low_precision_dtype(plan.precision) if uses_autocast else None,
        tied=tied, uninitialized=meta and init_weights is False,
    )
