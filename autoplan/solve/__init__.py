"""The planner's search: the fastest layout that fits, by exact branch-and-bound over strategies + CP-SAT.

1. Enumerate every strategy (:mod:`autoplan.solve.space`): pp × dp × tp factorisations of the world size
   (tp inside a node unless ``tp_across_nodes``; dp divides the global batch), microbatch size (its count
   follows), schedule (GPipe, 1F1B, interleaved with 2–4 virtual stages), DDP or FSDP — all pins honoured.
2. For each, an exact lower bound on its step time (:meth:`StrategyTables.lower_bound_s`: perfectly balanced
   stages at each layer's fastest choice, no memory limit) and on its memory; strategies whose memory bound
   exceeds the device are dropped.
3. In increasing lower-bound order, a greedy layout gives an upper bound; the best one found is the incumbent.
4. Strategies still below the incumbent get a memory-aware bound
   (:meth:`StrategyTables.refined_lower_bound_s`); in increasing order of it, each one whose bound is below
   the incumbent is solved exactly by CP-SAT (:mod:`autoplan.solve.cpsat`: stage cuts, per-layer recompute
   and tensor-parallel choices, memory per rank; objective = :func:`autoplan.cost.plan_cost.compose`), with the
   greedy layout as hint, the incumbent as cutoff and the bound as floor. The first bound at or above the
   incumbent stops the search: nothing after it can win.
5. The chosen layout drops recompute that buys nothing; the best layouts of other meshes, schedules, the
   other DP kind and no recompute are judged for ``plan.explain()``.

Solving the strategies one CP-SAT model at a time, rather than in one model with a selector per strategy,
keeps each model small (a few hundred variables) and lets the incumbent prune strategies before they are
built; the result is the same optimum. Everything is deterministic: a fixed order, one CP-SAT worker, a fixed
seed and a deterministic-time limit, so every rank plans the same layout.

Example:
    >>> import sys; sys.path.insert(0, "tests")
    >>> from graphs import gpt_like_graph
    >>> import autoplan
    >>> from autoplan.options import PlanOptions
    >>> plan = search(gpt_like_graph(layers=2, hidden=256, seq=128, vocab=1000),
    ...               autoplan.Cluster.preset("a100-80gb"), PlanOptions(global_batch_size=64))
    >>> plan.search.status, plan.mesh.world_size
    ('OPTIMAL', 8)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..cluster import Cluster
from ..errors import InfeasiblePlanError
from ..cost.plan_cost import PlanCost, Strategy, estimate_breakdown
from ..explain import format_bytes, format_seconds
from ..graph import ModelGraph
from ..options import PlanOptions
from ..vocabulary import SCHEDULES
from ..plan import Alternative, Mesh, ModelInfo, Plan, SearchInfo, Stage
from .cpsat import solve_strategy
from .space import enumerate_strategies, global_batch_size
from .tables import Assignment, LayerCostCache, StrategyTables, segments_of

__all__ = ["search", "DEFAULT_TIME_LIMIT_S"]

DEFAULT_TIME_LIMIT_S = 10.0
ALTERNATIVE_TIME_LIMIT_S = 0.1


@dataclass
class _Record:
    """What the search learned about one strategy."""

    lower_bound_s: float
    memory_lower_bound_bytes: float
    refined_lower_bound_s: float | None = None
    assignment: Assignment | None = None
    cost: PlanCost | None = None
    exact: bool = False  # CP-SAT proved this the strategy's optimum
    status: str = "pruned"  # pruned | memory | greedy | OPTIMAL | FEASIBLE | INFEASIBLE | UNKNOWN | timeout


@dataclass
class _Search:
    graph: ModelGraph
    cluster: Cluster
    options: PlanOptions
    deadline: float
    tables: list[StrategyTables] = field(default_factory=list)
    records: list[_Record] = field(default_factory=list)
    best: int | None = None
    frozen: bool = False  # once the plan is chosen, judging alternatives must not change it

    def refined(self, i: int) -> float:
        """The strategy's memory-aware lower bound (computed once)."""
        rec = self.records[i]
        if rec.refined_lower_bound_s is None:
            rec.refined_lower_bound_s = self.tables[i].refined_lower_bound_s()
            if rec.refined_lower_bound_s == float("inf"):
                rec.status = "memory"
        return rec.refined_lower_bound_s

    def best_s(self) -> float:
        return self.records[self.best].cost.step_time_s if self.best is not None else float("inf")

    def offer(self, i: int, assignment: Assignment, result: PlanCost, exact: bool, status: str) -> None:
        rec = self.records[i]
        if result.fits and (rec.cost is None or result.step_time_s < rec.cost.step_time_s - 1e-15):
            rec.assignment, rec.cost = assignment, result
        rec.exact = rec.exact or exact
        rec.status = status
        if result.fits and not self.frozen and result.step_time_s < self.best_s() - 1e-15:
            self.best = i

    def solve_exact(self, i: int, time_limit_s: float, cutoff: bool = True,
                    wall_limit_s: float | None = None) -> str:
        """CP-SAT on strategy ``i``: ``time_limit_s`` of deterministic time (the same on every machine and
        run), and at most ``wall_limit_s`` of wall time (the overall deadline; only that can differ)."""
        rec = self.records[i]
        result = solve_strategy(self.tables[i], cutoff_s=self.best_s() if cutoff and self.best is not None
                                else None, hint=rec.assignment, time_limit_s=time_limit_s,
                                wall_limit_s=wall_limit_s, lower_bound_s=self.refined(i))
        if result.assignment is not None:
            self.offer(i, result.assignment, self.tables[i].evaluate(result.assignment),
                       result.status == "OPTIMAL", result.status)
        else:
            rec.status = result.status
            rec.exact = rec.exact or result.status == "INFEASIBLE"
        return result.status


def search(graph: ModelGraph, cluster: Cluster, options: PlanOptions) -> Plan:
    """The fastest layout of ``graph`` on ``cluster`` that fits in memory, honouring every pin in ``options``.

    Raises :class:`autoplan.InfeasiblePlanError` when nothing fits (with the least memory a layout was found
    to need per device, the capacity, and what to relax), ``ValueError`` when the pins admit no layout.

    Example:
        >>> import sys; sys.path.insert(0, "tests")
        >>> from graphs import gpt_like_graph
        >>> import autoplan
        >>> plan = search(gpt_like_graph(layers=2, hidden=256, seq=128, vocab=1000),
        ...               autoplan.Cluster.preset("a100-80gb"), PlanOptions(global_batch_size=64, mesh={"pp": 2}))
        >>> plan.mesh.pp, len(plan.stages)
        (2, 2)
    """
    start = time.perf_counter()
    if not graph.layers:
        raise ValueError("the model graph has no layers; trace a model with at least one module or op")
    limit_s = options.time_limit_s or DEFAULT_TIME_LIMIT_S
    batch = global_batch_size(graph, options)
    strategies = enumerate_strategies(graph, cluster, options)
    segments = segments_of(graph.layers)
    cache = LayerCostCache(graph, cluster)
    state = _Search(graph, cluster, options, deadline=start + limit_s)
    for strategy in strategies:
        tables = StrategyTables(graph, cluster, strategy, segments, cache, options.recompute, batch)
        state.tables.append(tables)
        state.records.append(_Record(tables.lower_bound_s(), tables.memory_lower_bound_bytes()))
    capacity = cluster.device.usable_memory_bytes
    order = sorted(range(len(strategies)), key=lambda i: (state.records[i].lower_bound_s, i))
    order = [i for i in order if _memory_possible(state, i, capacity)]

    # Upper bounds: greedy layouts, cheapest bound first.
    for i in order:
        if state.records[i].lower_bound_s >= state.best_s() or time.perf_counter() > state.deadline:
            break
        if state.refined(i) >= state.best_s():
            continue
        found = state.tables[i].greedy()
        state.records[i].status = "greedy"
        if found is not None:
            state.offer(i, found[0], found[1], exact=False, status="greedy")

    # Exact: CP-SAT on every strategy whose refined bound beats the incumbent, most promising first.
    candidates = [i for i in order if state.records[i].lower_bound_s < state.best_s()]
    candidates.sort(key=lambda i: (state.refined(i), i))
    unresolved: list[float] = []
    for i in candidates:
        if state.refined(i) >= state.best_s():
            break
        remaining = state.deadline - time.perf_counter()
        if remaining <= 0:
            state.records[i].status = "timeout"
            unresolved.append(state.refined(i))
            continue
        status = state.solve_exact(i, max(0.5, limit_s / 8), wall_limit_s=remaining)
        if status not in ("OPTIMAL", "INFEASIBLE"):
            unresolved.append(state.refined(i))

    if state.best is None:
        raise _infeasible(state, strategies)
    best_s = state.best_s()
    still_open = [lb for lb in unresolved if lb < best_s]
    gap = (best_s - min(still_open)) / best_s if still_open else 0.0
    rec = state.records[state.best]
    if options.recompute == "auto":  # a pinned recompute stays everywhere it was asked for
        rec.assignment, rec.cost = state.tables[state.best].without_needless_recompute(rec.assignment, rec.cost)
    state.frozen = True
    alternatives = _alternatives(state)
    wall = time.perf_counter() - start
    info = SearchInfo(solver="cp-sat", status="OPTIMAL" if not still_open else "FEASIBLE", wall_s=wall,
                      candidates=len(strategies), gap=gap, alternatives=tuple(alternatives))
    return build_plan(graph, cluster, state.tables[state.best].strategy, state.records[state.best].assignment,
                      batch, info)


def _memory_possible(state: _Search, i: int, capacity: int) -> bool:
    rec = state.records[i]
    if rec.memory_lower_bound_bytes > capacity:
        rec.status = "memory"
        return False
    return True


def build_plan(graph: ModelGraph, cluster: Cluster, strategy: Strategy, assignment: Assignment,
               global_batch: int, search_info: SearchInfo) -> Plan:
    """The :class:`Plan` of an assignment, with ``predicted`` from :func:`autoplan.cost.plan_cost.estimate`."""
    layers = graph.layers
    stages = []
    tensor_parallel: dict[str, str] = {}
    for stage in assignment:
        names, recompute = [], []
        for i, choice in stage:
            layer = layers[i]
            names.append(layer.name)
            option = choice.option(layer)
            if option is not None:
                recompute.append(option.module)
            if choice.tp_on and strategy.tp > 1:
                for group in layer.tp_groups:
                    tensor_parallel.update(group.styles)
        stages.append(Stage(tuple(names), tuple(recompute)))
    plan = Plan(
        model=ModelInfo(graph.model_name, graph.fingerprint, graph.num_params), cluster=cluster,
        global_batch_size=global_batch, microbatch_size=strategy.microbatch_size,
        microbatches=strategy.microbatches, mesh=Mesh(strategy.pp, strategy.dp, strategy.tp),
        schedule=strategy.schedule, data_parallel=strategy.data_parallel, stages=tuple(stages),
        tensor_parallel=tensor_parallel, precision=strategy.precision, optimizer=strategy.optimizer,
        virtual_stages=strategy.virtual_stages, search=search_info,
    )
    return plan.replace(predicted=estimate_breakdown(graph, plan).predicted)


# -- alternatives ---------------------------------------------------------------------------------------------

def _alternatives(state: _Search) -> list[Alternative]:
    """The best layout of other meshes, schedules, the other DP kind, and without recompute, each with why it
    lost."""
    chosen_i = state.best
    chosen = state.tables[chosen_i].strategy
    best = state.records[chosen_i].cost
    groups: list[tuple[str, list[int]]] = []
    by_mesh: dict[tuple[int, int, int], list[int]] = {}
    for i, t in enumerate(state.tables):
        s = t.strategy
        by_mesh.setdefault((s.pp, s.dp, s.tp), []).append(i)
    other_meshes = sorted((k for k in by_mesh if k != (chosen.pp, chosen.dp, chosen.tp)),
                          key=lambda k: min(_known_s(state, i) for i in by_mesh[k]))
    for key in other_meshes[:3]:
        groups.append(("mesh", by_mesh[key]))
    pure_dp = next((k for k in by_mesh if k[0] == 1 and k[2] == 1), None)
    if pure_dp and pure_dp != (chosen.pp, chosen.dp, chosen.tp) and pure_dp not in other_meshes[:3]:
        groups.append(("mesh", by_mesh[pure_dp]))
    same_mesh = by_mesh[(chosen.pp, chosen.dp, chosen.tp)]
    for schedule in SCHEDULES:
        if schedule != chosen.schedule:
            members = [i for i in same_mesh if state.tables[i].strategy.schedule == schedule]
            if members:
                groups.append(("schedule", members))
    other_dp = [i for i in same_mesh if state.tables[i].strategy.data_parallel != chosen.data_parallel
                and state.tables[i].strategy.schedule == chosen.schedule]
    if other_dp:
        groups.append(("dp", other_dp))
    judged = [(kind, _judge(state, members, best)) for kind, members in groups]
    meshes = sorted((a for kind, a in judged if kind == "mesh" and a is not None),
                    key=lambda a: (a.step_time_s is None, a.step_time_s or 0.0))
    out = meshes + [a for kind, a in judged if kind != "mesh"]
    uses_recompute = any(choice.recompute is not None for stage in state.records[chosen_i].assignment
                         for _, choice in stage)
    if uses_recompute and state.options.recompute == "auto":
        out.append(_without_recompute(state, chosen_i, best))
    return [a for a in out if a is not None]


def _known_s(state: _Search, i: int) -> float:
    rec = state.records[i]
    return rec.cost.step_time_s if rec.cost is not None else rec.lower_bound_s + 1e9 * (rec.status == "memory")


def _judge(state: _Search, members: list[int], best: PlanCost) -> Alternative | None:
    """Solve the most promising strategy of ``members`` and say how it compares with the chosen plan."""
    fits = [i for i in members if state.records[i].status != "memory"]
    known = [i for i in fits if state.records[i].cost is not None]
    if known:
        pick = min(known, key=lambda j: (state.records[j].cost.step_time_s, j))
    else:
        few = sorted(fits, key=lambda j: (state.records[j].lower_bound_s, j))[:8]
        finite = [j for j in few if state.refined(j) < float("inf")]
        pick = min(finite, key=lambda j: (state.refined(j), j)) if finite else None
    if pick is not None:
        rec = state.records[pick]
        if rec.cost is None:
            found = state.tables[pick].greedy()
            if found is not None:
                state.offer(pick, found[0], found[1], exact=False, status="greedy")
        if not rec.exact:
            state.solve_exact(pick, ALTERNATIVE_TIME_LIMIT_S, cutoff=False)
        if rec.cost is not None:
            return Alternative(state.tables[pick].strategy.describe(), rec.cost.step_time_s,
                               _why_slower(rec.cost, best, state.tables[pick].strategy, state.cluster))
    i = min(members, key=lambda j: (state.records[j].memory_lower_bound_bytes, j))
    return Alternative(state.tables[i].strategy.describe(), None, _why_no_fit(state.tables[i]))


def _without_recompute(state: _Search, i: int, best: PlanCost) -> Alternative | None:
    t = state.tables[i]
    tables = StrategyTables(t.graph, t.cluster, t.strategy, t.segments, t.cache, "none", t.global_batch_size)
    greedy = tables.greedy()
    result = solve_strategy(tables, cutoff_s=None, hint=greedy[0] if greedy else None,
                            time_limit_s=ALTERNATIVE_TIME_LIMIT_S)
    label = t.strategy.describe() + ", no recompute"
    found = [tables.evaluate(result.assignment)] if result.assignment is not None else []
    found += [greedy[1]] if greedy else []
    if not found:
        return Alternative(label, None, _why_no_fit(tables))
    cost = min(found, key=lambda c: c.step_time_s)
    return Alternative(label, cost.step_time_s, _why_slower(cost, best, t.strategy, t.cluster))


def _why_slower(alt: PlanCost, best: PlanCost, strategy: Strategy, cluster: Cluster) -> str:
    pct = 100 * (alt.step_time_s / best.step_time_s - 1)
    parts = {"compute": alt.compute_s - best.compute_s, "recompute": alt.recompute_s - best.recompute_s,
             "comm": alt.comm_s - best.comm_s, "bubble": alt.bubble_s - best.bubble_s,
             "optimizer": alt.optimizer_s - best.optimizer_s}
    name, delta = max(parts.items(), key=lambda kv: kv[1])
    crosses = f"; tp={strategy.tp} crosses nodes" if strategy.tp > cluster.devices_per_node else ""
    if pct <= 1e-6:
        return "ties the chosen plan (first in the search order wins)"
    return f"+{pct:.1f}% step time ({name} +{format_seconds(delta)}){crosses}"


def _why_no_fit(tables: StrategyTables) -> str:
    _, lean = tables.leanest()
    need = max(lean.peak_memory_bytes)
    if need <= tables.capacity_bytes:
        return f"no layout found faster within the time limit (leanest layout needs {format_bytes(need)})"
    return f"needs {format_bytes(need)} > {format_bytes(tables.capacity_bytes)} per device"


# -- nothing fits ---------------------------------------------------------------------------------------------

def _infeasible(state: _Search, strategies: list[Strategy]) -> InfeasiblePlanError:
    """The error for "no layout fits": the leanest layout found, the capacity, and what to relax."""
    capacity = state.cluster.device.usable_memory_bytes
    lean_i, lean_cost = None, None
    seen: set[tuple] = set()
    for i in sorted(range(len(strategies)), key=lambda j: (strategies[j].microbatch_size, j)):
        s = strategies[i]
        key = (s.pp, s.dp, s.tp, s.data_parallel, s.schedule)
        if key in seen:
            continue
        seen.add(key)
        _, cost = state.tables[i].leanest()
        if lean_cost is None or max(cost.peak_memory_bytes) < max(lean_cost.peak_memory_bytes):
            lean_i, lean_cost = i, cost
    need = max(lean_cost.peak_memory_bytes)
    o = state.options
    if need <= capacity:  # the search ran out of time before it proved or found anything
        limit = o.time_limit_s or DEFAULT_TIME_LIMIT_S
        return InfeasiblePlanError(
            f"no layout of {state.graph.model_name} was found within time_limit_s={limit:g}, although one fits "
            f"({strategies[lean_i].describe()} needs {format_bytes(need)} of {format_bytes(capacity)} per "
            f"device); raise time_limit_s or pin more of the layout", min_memory_bytes=int(need),
            capacity_bytes=int(capacity))
    relax = [f"more devices (the world is {state.cluster.world_size})"]
    if (o.microbatch_size or 1) > 1:
        relax.append(f"a smaller microbatch_size than {o.microbatch_size}")
    if o.recompute in ("none", "selective"):
        relax.append("recompute='full' or 'auto'")
    if o.data_parallel == "ddp":
        relax.append("data_parallel='fsdp' or 'auto'")
    if o.mesh:
        relax.append(f"fewer mesh pins than {o.mesh}")
    if o.precision == "fp32":
        relax.append("precision='bf16'")
    device = state.cluster.device
    message = (
        f"no layout of {state.graph.model_name} ({state.graph.num_params:,} parameters) fits "
        f"{state.cluster.world_size} × {device.name}: the leanest layout found "
        f"({strategies[lean_i].describe()}) needs {format_bytes(need)} per device, but each device has "
        f"{format_bytes(capacity)} usable ({format_bytes(device.memory_bytes)} − "
        f"{format_bytes(device.memory_headroom_bytes)} headroom); try " + ", ".join(relax)
    )
    return InfeasiblePlanError(message, min_memory_bytes=int(need), capacity_bytes=int(capacity))
