"""Pipeline parallelism: this rank's stages as ``torch.distributed.pipelining`` PipelineStages driven by the plan's
schedule, and the gradient sync of weights tied across stages.

Stage ``k`` runs on pipeline rank ``k % pp`` (with ``virtual_stages`` > 1, each rank holds that many stages and the
interleaved 1F1B schedule of Narayanan et al. SC'21 §2.2 runs them). Gradients are averaged over microbatches
once per step (:func:`average_microbatch_gradients`), so a mean loss per microbatch gives the gradient of the mean
over the batch.

Example:
    >>> from autoplan.execute.pipeline import local_stage_indices
    >>> local_stage_indices(num_stages=8, pp=4, pp_rank=1)
    [1, 5]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..plan import Mesh, Plan
from .mesh import rank_at
from .validate import owning_layer

__all__ = ["local_stage_indices", "build_schedule", "average_microbatch_gradients", "TiedGradientGroup",
           "tied_gradient_groups"]

_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def local_stage_indices(num_stages: int, pp: int, pp_rank: int) -> list[int]:
    """The stage indices pipeline rank ``pp_rank`` runs, in order.

    Example:
        >>> local_stage_indices(num_stages=2, pp=2, pp_rank=0)
        [0]
    """
    return [k for k in range(num_stages) if k % pp == pp_rank]


def build_schedule(plan: Plan, modules: Sequence[tuple[int, nn.Module]], pp_group: dist.ProcessGroup,
                   device: torch.device, loss_fn: Callable):
    """A torch pipelining schedule over this rank's ``(stage index, module)`` pairs.

    Example (under torchrun, 2 ranks): ``build_schedule(plan, [(rank, stage_module)], mesh["pp"].get_group(),
    torch.device("cpu"), loss_fn).step(x, target=y)``
    """
    num_stages = len(plan.stages)
    stages = [PipelineStage(module, k, num_stages, device, group=pp_group) for k, module in modules]
    # Each stage would divide its module's gradients by the microbatch count when its own last backward ends; a
    # weight two of this rank's stages share (an embedding tied to a later stage under an interleaved schedule)
    # would be divided twice, once part-way through its accumulation: average_microbatch_gradients does it once.
    if plan.schedule == "interleaved":
        return ScheduleInterleaved1F1B(stages, n_microbatches=plan.microbatches, loss_fn=loss_fn, scale_grads=False)
    if len(stages) != 1:
        raise ValueError(f"schedule {plan.schedule!r} runs one stage per rank; this rank has {len(stages)}")
    return _SCHEDULES[plan.schedule](stages[0], n_microbatches=plan.microbatches, loss_fn=loss_fn,
                                     scale_grads=False)


@torch.no_grad()
def average_microbatch_gradients(modules: Sequence[nn.Module], microbatches: int) -> None:
    """Divide every gradient of this rank's stage ``modules`` by ``microbatches``, once per parameter even where
    several stages hold it, after the schedule's backward (and FSDP's reduction) is done.

    Example:
        >>> shared = torch.nn.Linear(2, 2)
        >>> stages = [torch.nn.Sequential(shared), torch.nn.Sequential(shared, torch.nn.Linear(2, 2))]
        >>> for p in shared.parameters(): p.grad = torch.full_like(p, 4.0)
        >>> average_microbatch_gradients(stages, 4)
        >>> shared.weight.grad[0, 0].item(), stages[1][1].weight.grad is None
        (1.0, True)
    """
    seen: set[int] = set()
    for module in modules:
        for param in module.parameters():
            if param.grad is not None and id(param) not in seen:
                seen.add(id(param))
                param.grad.div_(microbatches)


@dataclass
class TiedGradientGroup:
    """Parameter names (as held on this rank) whose gradients are summed over ``group``: ranks holding copies of
    one tied weight in different pipeline stages, at this rank's dp and tp coordinates."""

    names: tuple[str, ...]
    group: dist.ProcessGroup


def tied_gradient_groups(plan: Plan, tied_names: Sequence[Sequence[str]], rank: int) -> list[TiedGradientGroup]:
    """Process groups for weights tied across pipeline ranks (e.g. a GPT's embedding and head). Every rank must
    call this (``new_group`` is collective), in the same order.

    Example:
        >>> import autoplan
        >>> tied_gradient_groups(autoplan.Plan.example(), [["tok.weight", "head.weight"]], rank=0)  # pp = 1
        []
    """
    mesh: Mesh = plan.mesh
    result = []
    if mesh.pp == 1:
        return result
    stage_of = {layer: k for k, stage in enumerate(plan.stages) for layer in stage.layers}
    for names in tied_names:
        holders: dict[int, list[str]] = {}
        for name in names:
            layer = owning_layer(name.rpartition(".")[0], plan.layers)
            if layer is None:
                continue
            holders.setdefault(stage_of[layer] % mesh.pp, []).append(name)
        if len(holders) < 2:
            continue
        pp_ranks = sorted(holders)
        for dp in range(mesh.dp):
            for tp in range(mesh.tp):
                ranks = [rank_at(mesh, s, dp, tp) for s in pp_ranks]
                group = dist.new_group(ranks)
                if rank in ranks:
                    mine = holders[pp_ranks[ranks.index(rank)]]
                    result.append(TiedGradientGroup(tuple(mine), group))
    return result


def sync_tied_gradients(groups: Sequence[TiedGradientGroup], params: dict[str, nn.Parameter]) -> None:
    """Sum each tied weight's gradient over the ranks that hold a copy, so the copies stay equal after the step.

    Example:
        >>> sync_tied_gradients([], {})
    """
    for tied in groups:
        param = params[tied.names[0]]
        grad = param.grad
        if grad is None:
            grad = torch.zeros_like(param)
            param.grad = grad
        if hasattr(grad, "placements") and grad.placements != param.placements:
            # An embedding's gradient may come back replicated while the weight is sharded: match the copies.
            grad = grad.redistribute(grad.device_mesh, param.placements)
            param.grad = grad
        local = getattr(grad, "_local_tensor", grad)
        dist.all_reduce(local, group=tied.group)
