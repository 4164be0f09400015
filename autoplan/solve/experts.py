"""The fastest layout with the routed experts sharded over the data-parallel ranks (expert parallelism, priced by
:mod:`autoplan.cost.experts`), so that ``expert_parallel="auto"`` finds models that fit only that way.

The executor runs expert parallelism on dp-only meshes (tp = pp = 1, ep = dp = the world size, DDP or FSDP:
:data:`autoplan.execute.experts.SUPPORTED`), which leaves few layouts: the search's own strategies for that mesh
(:func:`autoplan.solve.space.enumerate_strategies` with tp = pp = 1 pinned: DDP or FSDP, every microbatch size,
FSDP's resharding, all other pins honoured) and, per strategy, the layers to recompute. A pinned recompute mode
applies everywhere, as in the search; ``"auto"`` recomputes whole layers, most activation bytes saved per
recomputed FLOP first, as few as fit (found by bisection: each one more recomputed saves memory and costs time).
Every candidate is priced by :func:`autoplan.cost.plan_cost.estimate_breakdown` with the experts sharded; the
fastest that fits wins. A model without experts costs nothing: the caller asks only when the trace found some.

:func:`plan_with_expert_parallel` is what ``autoplan.plan(..., expert_parallel=...)`` runs: ``True`` takes this
layout, ``"auto"`` the faster of it and the search's best layout without it (when the model has experts).

Example (a model without experts has no such layout, and says why):
    >>> import autoplan
    >>> from autoplan.options import PlanOptions
    >>> from autoplan.synthetic import mlp_graph
    >>> found = search_expert_parallel(mlp_graph(widths=(8, 8), batch=8),
    ...                                autoplan.Cluster.preset("cpu", devices_per_node=2), PlanOptions())
    >>> found.plan, found.why
    (None, 'the model has no experts module (3-D gate_up_proj / down_proj weights and num_experts)')
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import NamedTuple

from ..cluster import Cluster
from ..cost.experts import expert_parallel_refusal
from ..cost.plan_cost import PlanCost, Strategy, estimate_breakdown
from ..errors import InfeasiblePlanError
from ..graph import ModelGraph
from ..options import PlanOptions
from ..plan import Mesh, ModelInfo, Plan, SearchInfo, Stage
from .space import enumerate_strategies, global_batch_size, layer_choices

__all__ = ["ExpertLayout", "search_expert_parallel", "plan_with_expert_parallel"]


class ExpertLayout(NamedTuple):
    """:func:`search_expert_parallel`'s answer: the plan, or ``None`` and why (``least_bytes``: when layouts were
    priced but none fits, the least peak memory one of them needs)."""

    plan: Plan | None
    why: str = ""
    least_bytes: int | None = None


def search_expert_parallel(graph: ModelGraph, cluster: Cluster, options: PlanOptions) -> ExpertLayout:
    """The fastest layout of ``graph`` on ``cluster`` with its experts sharded over every rank that fits, under
    ``options``' pins (see the module docstring); its plan is ``None`` when there is none, and ``why`` says why.

    Example: see the module docstring.
    """
    start = time.perf_counter()
    world = cluster.world_size
    if not graph.experts:
        return ExpertLayout(None, "the model has no experts module (3-D gate_up_proj / down_proj weights and "
                                  "num_experts)")
    pinned = {axis: options.mesh.get(axis, 1) for axis in ("tp", "pp")}
    if pinned["tp"] > 1 or pinned["pp"] > 1 or options.mesh.get("dp", world) != world:
        return ExpertLayout(None, f"expert parallelism runs on dp-only meshes (tp = pp = 1, dp = the {world} "
                                  f"devices), but mesh {options.mesh} is pinned")
    if world == 1:
        return ExpertLayout(None, "one device: there is no other rank to hold experts")
    uneven = sorted({e.num_experts for e in graph.experts.values() if e.num_experts % world})
    if uneven:
        return ExpertLayout(None, f"ep = dp = {world} does not divide the {uneven[0]} experts of a layer")
    try:
        strategies = enumerate_strategies(graph, cluster, replace(options, mesh={"tp": 1, "pp": 1, "dp": world}))
    except ValueError as e:
        return ExpertLayout(None, f"no dp-only strategy: {e}")
    batch = global_batch_size(graph, options)
    model = ModelInfo(graph.model_name, graph.fingerprint, graph.num_params)
    best: tuple[Plan, PlanCost] | None = None
    least: int | None = None
    for strategy in strategies:
        found = _fastest_recompute(graph, cluster, strategy, batch, model, options.recompute)
        if found is None:
            continue
        peak = max(found[1].peak_memory_bytes)
        least = peak if least is None else min(least, peak)
        if found[1].fits and (best is None or found[1].step_time_s < best[1].step_time_s):
            best = found
    if best is None:
        need = f"; the least memory one needs is {least / 2**30:.1f} GiB" if least is not None else ""
        return ExpertLayout(None, f"no dp-only layout with the experts sharded fits {cluster.device.name} "
                                  f"({cluster.device.usable_memory_bytes / 2**30:.1f} GiB usable; {len(strategies)} "
                                  f"strategies tried{need})", least)
    plan, priced = best
    info = SearchInfo(solver="expert-parallel", status="FEASIBLE", wall_s=time.perf_counter() - start,
                      candidates=len(strategies))
    return ExpertLayout(plan.replace(predicted=priced.predicted, search=info))


def _fastest_recompute(graph: ModelGraph, cluster: Cluster, strategy: Strategy, batch: int, model: ModelInfo,
                       mode: str) -> tuple[Plan, PlanCost] | None:
    """The plan of ``strategy`` with the fewest layers recomputed (``mode="auto"``) that fits, and its price; when
    none fits, the one that needs the least memory (all of them recomputed); ``None`` when none can be priced."""
    def plan_with(recompute: list[str]) -> Plan:
        return Plan(model=model, cluster=cluster, global_batch_size=batch, microbatch_size=strategy.microbatch_size,
                    microbatches=strategy.microbatches, mesh=Mesh(dp=strategy.dp), schedule=strategy.schedule,
                    data_parallel=strategy.data_parallel, stages=(Stage(tuple(l.name for l in graph.layers),
                                                                        tuple(recompute)),),
                    precision=strategy.precision, optimizer=strategy.optimizer, expert_parallel=strategy.dp,
                    fsdp_reshard=strategy.fsdp_reshard)

    def priced(recompute: list[str]) -> tuple[Plan, PlanCost] | None:
        plan = plan_with(recompute)
        if expert_parallel_refusal(graph, plan) is not None:
            return None
        return plan, estimate_breakdown(graph, plan)

    if mode != "auto":  # the pinned mode wherever a layer offers it (autoplan.solve.space.layer_choices)
        chosen = []
        for layer in graph.layers:
            option = layer_choices(layer, 1, mode)[0].option(layer)
            chosen += [option.module] if option is not None else []
        return priced(chosen)
    whole = sorted((o for layer in graph.layers for o in layer.recompute_options if o.module == layer.name),
                   key=lambda o: -o.saved_activation_bytes / max(o.forward_flops, 1))
    order = {layer.name: layer.index for layer in graph.layers}

    def first(k: int) -> list[str]:  # the k best whole layers, listed in model order as the search lists them
        return sorted((o.module for o in whole[:k]), key=order.__getitem__)

    none = priced([])
    if none is None or none[1].fits:
        return none
    low, high = 0, len(whole)  # fits with all `high` recomputed, not with `low`
    top = priced(first(len(whole)))
    if top is None or not top[1].fits:
        return top
    while high - low > 1:
        mid = (low + high) // 2
        got = priced(first(mid))
        if got is not None and got[1].fits:
            high, top = mid, got
        else:
            low = mid
    return top


def plan_with_expert_parallel(graph: ModelGraph, cluster: Cluster, options: PlanOptions, search) -> Plan:
    """The plan ``autoplan.plan`` returns for ``options.expert_parallel``: ``False``, or ``"auto"`` on a model
    without experts, the search's (``search(graph, cluster, options)``); ``True`` the fastest layout with the
    experts sharded (``ValueError`` when the model or the pins cannot have one, :class:`autoplan.InfeasiblePlanError`
    when none fits); ``"auto"`` the faster of the two that fits, both prices in ``plan.search.notes``.

    Example (no experts: "auto" is the search's plan):
        >>> import autoplan
        >>> from autoplan.options import PlanOptions
        >>> from autoplan.solve import search
        >>> from autoplan.synthetic import mlp_graph
        >>> cluster = autoplan.Cluster.preset("cpu", devices_per_node=2)
        >>> graph, options = mlp_graph(widths=(8, 8), batch=8), PlanOptions(expert_parallel="auto")
        >>> a, b = plan_with_expert_parallel(graph, cluster, options, search), search(graph, cluster, options)
        >>> (a.mesh, a.predicted, a.search.notes) == (b.mesh, b.predicted, b.search.notes)
        True
    """
    mode = options.expert_parallel
    if mode is False or (mode == "auto" and not graph.experts):
        return search(graph, cluster, options)
    if mode is True:
        found = search_expert_parallel(graph, cluster, options)
        if found.plan is not None:
            return found.plan
        if found.least_bytes is not None:
            raise InfeasiblePlanError(f"expert_parallel=True: {found.why}; use more devices, a smaller batch or "
                                      f"expert_parallel='auto'", min_memory_bytes=found.least_bytes,
                                      capacity_bytes=cluster.device.usable_memory_bytes)
        raise ValueError(f"expert_parallel=True cannot shard this model's experts: {found.why}; use "
                         f"expert_parallel=False or 'auto'")
    start = time.perf_counter()
    try:
        off: Plan | None = search(graph, cluster, options)
        refused = None
    except InfeasiblePlanError as e:
        off, refused = None, e
    found = search_expert_parallel(graph, cluster, options)
    on = found.plan
    if on is None and off is None:
        raise refused
    off_s = off.predicted.step_time_s if off is not None else None
    on_s = on.predicted.step_time_s if on is not None else None
    chosen = on is not None and (off is None or on_s < off_s)
    ep = cluster.world_size
    if on is None:
        note = f"expert parallelism not used: {found.why}"
    elif off is None:
        note = (f"expert parallelism (ep={ep}, {on.data_parallel}) priced {on_s:.4g} s per step; without it no layout "
                f"fits: chosen")
    else:
        note = (f"expert parallelism (ep={ep}, {on.data_parallel}) priced {on_s:.4g} s per step against {off_s:.4g} s "
                f"for the best layout without it ({off.mesh}, {off.data_parallel}): "
                f"{'chosen' if chosen else 'not chosen'}")
    base = on if chosen else off
    wall = base.search.wall_s if base is off else time.perf_counter() - start  # both searches led to it
    return base.replace(search=replace(base.search, notes=tuple(base.search.notes) + (note,), wall_s=wall))
