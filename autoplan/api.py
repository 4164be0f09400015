"""The public entry points, orchestration only: trace → solve → Plan, and Plan → ParallelModel.

Example:
    >>> import torch, autoplan
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    >>> plan = autoplan.plan(model, (torch.randn(32, 64),), cluster=autoplan.Cluster.preset("a100-80gb"))
    >>> plan.mesh.world_size
    8
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .cluster import Cluster
from .execute import parallelize
from .options import PlanOptions
from .plan import Plan
from .trace import trace

__all__ = ["plan", "parallelize"]


def plan(
    model: torch.nn.Module,
    example_inputs: Any = None,
    *,
    cluster: Cluster | None = None,
    global_batch_size: int | None = None,
    precision: str = "bf16",
    optimizer: str = "adamw",
    mesh: dict[str, int] | None = None,
    microbatch_size: int | None = None,
    recompute: str = "auto",
    data_parallel: str = "auto",
    schedule: str = "auto",
    time_limit_s: float | None = None,
    tp_across_nodes: bool = False,
    sequence_parallel: str | bool = "auto",
    expert_parallel: str | bool = False,
    fsdp_reshard: str = "auto",
) -> Plan:
    """Trace ``model`` on ``example_inputs`` and return the fastest layout that fits ``cluster``.

    ``example_inputs`` is a tensor, a tuple of positional inputs, or a dict of keyword inputs; dim 0 of every
    input is the batch. Raises :class:`autoplan.InfeasiblePlanError` when no layout fits.

    ``sequence_parallel``: Megatron sequence parallelism (Korthikanti et al. 2022) in the tensor-parallel layers
    that allow it — ``"auto"`` prices every tensor-parallel layout with and without it and keeps the faster,
    ``True`` uses it wherever tp > 1, with or without pipeline stages (``ValueError`` when tp = 1 is pinned, or
    when no layer of the model can run it), ``False`` never.

    ``expert_parallel``: shard the routed experts of a mixture-of-experts model (transformers' Mixtral, Qwen2-MoE)
    over the data-parallel ranks, each holding E/dp experts (:mod:`autoplan.execute.experts`) — ``True`` plans the
    fastest data-parallel layout (tp = pp = 1, DDP or FSDP for the rest) with it (``ValueError`` when the model has
    no experts module or dp does not divide their number, :class:`autoplan.InfeasiblePlanError` when no such layout
    fits), ``"auto"`` compares that layout with the best one without it and keeps the faster that fits
    (:mod:`autoplan.solve.experts`; a model without experts costs nothing more), ``False`` (default) never.

    ``fsdp_reshard``: how FSDP treats its gathered weights between the microbatches of a step (``Plan.fsdp_reshard``)
    — ``"auto"`` prices both and keeps the faster that fits, ``"step"`` keeps them from the first forward to the
    last backward (one all-gather and one reduce-scatter per unit and step), ``"microbatch"`` reshards after every
    forward and backward (ZeRO-3 with gradient accumulation: less memory, 2·m all-gathers and m reduce-scatters per
    unit; FSDP over dp > 1 and no pipeline only, ``ValueError`` when the pins rule that out).

    Example:
        >>> import torch, autoplan
        >>> m = torch.nn.Linear(32, 32)
        >>> autoplan.plan(m, torch.randn(8, 32), cluster=autoplan.Cluster.preset("cpu", devices_per_node=2),
        ...               precision="fp32").mesh.world_size
        2
    """
    from .solve import search
    from .solve.experts import plan_with_expert_parallel

    options = PlanOptions(
        global_batch_size=global_batch_size, precision=precision, optimizer=optimizer, mesh=mesh or {},
        microbatch_size=microbatch_size, recompute=recompute, data_parallel=data_parallel, schedule=schedule,
        time_limit_s=time_limit_s, tp_across_nodes=tp_across_nodes, sequence_parallel=sequence_parallel,
        expert_parallel=expert_parallel, fsdp_reshard=fsdp_reshard,
    )
    if cluster is None:
        cluster = Cluster.detect()
    if not isinstance(cluster, Cluster):
        raise ValueError(f"cluster must be an autoplan.Cluster, got {type(cluster).__name__}")
    graph = trace(model, example_inputs)
    result = plan_with_expert_parallel(graph, cluster, options, search)
    tokens = tokens_per_sample(example_inputs)
    if tokens is not None:
        result = result.replace(model=replace(result.model, tokens_per_sample=tokens))
    return result


def tokens_per_sample(example_inputs: Any) -> int | None:
    """The sequence length when the first input is a (batch, sequence) tensor of token ids, else None.

    Example:
        >>> import torch
        >>> tokens_per_sample((torch.zeros(4, 128, dtype=torch.long),)), tokens_per_sample(torch.randn(4, 8))
        (128, None)
    """
    first = example_inputs
    if isinstance(first, dict):
        first = next(iter(first.values()), None)
    elif isinstance(first, (tuple, list)):
        first = first[0] if first else None
    if isinstance(first, torch.Tensor) and first.dim() == 2 and not first.dtype.is_floating_point \
            and first.dtype != torch.bool:
        return int(first.shape[1])
    return None
