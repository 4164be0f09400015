"""The planner's search: the fastest layout that fits, by exact branch-and-bound over strategies + CP-SAT.

1. Enumerate every strategy (:mod:`autoplan.solve.space`): pp × dp × tp factorisations of the world size
   (tp inside a node unless ``tp_across_nodes``; dp divides the global batch), microbatch size (its count
   follows), schedule (GPipe, 1F1B, interleaved with 2–4 virtual stages), DDP or FSDP — all pins honoured.
2. For each, an exact lower bound on its step time (:func:`autoplan.solve.bounds.lower_bound_s`: perfectly
   balanced stages at each layer's fastest choice, no memory limit) and on its memory; strategies whose memory
   bound exceeds the device are dropped. A cheaper bound below it (relaxed rows,
   :meth:`autoplan.solve.tables.LazyTables.relaxed`) comes first: a strategy's full tables are built only when
   that bound, taken in increasing order, still beats the incumbent.
3. In increasing lower-bound order, a greedy layout (:mod:`autoplan.solve.greedy`) gives an upper bound; the
   best one found is the incumbent.
4. Strategies still below the incumbent get a memory-aware bound
   (:func:`autoplan.solve.bounds.refined_bound`); in increasing order of it, each one whose bound is below
   the incumbent is solved exactly by CP-SAT (:mod:`autoplan.solve.cpsat`: stage cuts, per-layer recompute
   and tensor-parallel choices, memory per rank; objective = :func:`autoplan.cost.plan_cost.compose`), with the
   greedy layout as hint, the incumbent as cutoff and the bound as floor. The first bound at or above the
   incumbent stops the search: nothing after it can win.
5. The chosen layout drops recompute that buys nothing; the best layouts of other meshes, schedules, the
   other DP kind, no recompute and (FSDP) the other ``fsdp_reshard`` mode are judged for ``plan.explain()`` (:mod:`autoplan.solve.alternatives`) when
   ``plan.search.alternatives`` is first read (the same report as judging them at once; ``search.wall_s``
   counts the search up to the chosen plan).

Solving the strategies one CP-SAT model at a time, rather than in one model with a selector per strategy,
keeps each model small (a few hundred variables) and lets the incumbent prune strategies before they are
built; the result is the same optimum. Everything is deterministic: a fixed order, one CP-SAT worker, a fixed
seed and a deterministic-time limit, so every rank plans the same layout.

Example:
    >>> from autoplan.synthetic import gpt_like_graph
    >>> import autoplan
    >>> from autoplan.options import PlanOptions
    >>> plan = search(gpt_like_graph(layers=2, hidden=256, seq=128, vocab=1000),
    ...               autoplan.Cluster.preset("a100-80gb"), PlanOptions(global_batch_size=64))
    >>> plan.search.status, plan.mesh.world_size
    ('OPTIMAL', 8)
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field, replace

from ..cluster import Cluster
from ..trace.tp_notes import tensor_parallel_notes
from ..cost.sequence import sequence_parallel_applies
from ..cost.plan_cost import PlanCost, Strategy, estimate_breakdown
from ..graph import ModelGraph
from ..options import PlanOptions
from ..plan import Mesh, ModelInfo, Plan, SearchInfo, Stage
from .bounds import RefinedBound, lower_bound_s, memory_lower_bound_bytes, refined_bound
from .cpsat import ModelResult, solve_strategy
from .greedy import greedy
from .space import global_batch_size
from .tables import Assignment, LazyTables, StrategyTables
from .alternatives import LazyAlternatives, infeasible_error

__all__ = ["search", "DEFAULT_TIME_LIMIT_S"]

DEFAULT_TIME_LIMIT_S = 10.0


@dataclass
class _Record:
    """What the search learned about one strategy."""

    lower_bound_s: float
    memory_lower_bound_bytes: float
    refined: RefinedBound | None = None
    assignment: Assignment | None = None
    cost: PlanCost | None = None
    exact: bool = False  # CP-SAT proved this the strategy's optimum
    status: str = "pruned"  # pruned | memory | greedy | OPTIMAL | FEASIBLE | INFEASIBLE | UNKNOWN | timeout
    known: bool = True  # the bounds are exact (else lower_bound_s is a cheaper bound below the exact one)


@dataclass
class _Search:
    graph: ModelGraph
    cluster: Cluster
    options: PlanOptions
    deadline: float
    tables: "LazyTables | list[StrategyTables]" = field(default_factory=list)
    records: list[_Record] = field(default_factory=list)
    best: int | None = None
    frozen: bool = False  # once the plan is chosen, judging alternatives must not change it

    def know(self, i: int) -> None:
        """Strategy ``i``'s exact bounds (from its full tables), in place of its cheap bound."""
        rec = self.records[i]
        if not rec.known:
            tables = self.tables[i]
            rec.lower_bound_s, rec.memory_lower_bound_bytes = lower_bound_s(tables), memory_lower_bound_bytes(tables)
            rec.known = True
            if rec.memory_lower_bound_bytes > self.cluster.device.usable_memory_bytes:
                rec.status = "memory"

    def complete(self) -> None:
        """Exact bounds of every strategy (what judging alternatives reads), as if all had been built."""
        for i in range(len(self.records)):
            self.know(i)

    def refined_bound(self, i: int) -> RefinedBound:
        """The strategy's memory-aware lower bound (computed once)."""
        rec = self.records[i]
        if rec.refined is None:
            rec.refined = refined_bound(self.tables[i])
            if rec.refined.bound_s == float("inf"):
                rec.status = "memory"
        return rec.refined

    def refined(self, i: int) -> float:
        """The strategy's memory-aware lower bound in seconds."""
        return self.refined_bound(i).bound_s

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
        return self.take(i, self.solve_model(i, time_limit_s, cutoff, wall_limit_s))

    def solve_model(self, i: int, time_limit_s: float, cutoff: bool = True,
                    wall_limit_s: float | None = None) -> ModelResult:
        """CP-SAT on strategy ``i`` without recording the result (:meth:`take` does): reads the state, changes
        nothing once the strategy's refined bound is known, so solves of different strategies may run at once."""
        rec = self.records[i]
        bound = self.refined_bound(i)
        return solve_strategy(self.tables[i], bound, cutoff_s=self.best_s() if cutoff and self.best is not None
                              else None, hint=rec.assignment, time_limit_s=time_limit_s,
                              wall_limit_s=wall_limit_s, lower_bound_s=bound.bound_s)

    def take(self, i: int, result: ModelResult) -> str:
        """Record a CP-SAT result of strategy ``i``; returns its status."""
        rec = self.records[i]
        if result.assignment is not None:
            self.offer(i, result.assignment, self.tables[i].evaluate(result.assignment),
                       result.status == "OPTIMAL", result.status)
        else:
            rec.status = result.status
            rec.exact = rec.exact or result.status == "INFEASIBLE"
        return result.status


def search(graph: ModelGraph, cluster: Cluster, options: PlanOptions, *, lazy_alternatives: bool = True) -> Plan:
    """The fastest layout of ``graph`` on ``cluster`` that fits in memory, honouring every pin in ``options``.

    ``plan.search.alternatives`` are judged when first read (``lazy_alternatives``), or before returning
    (``lazy_alternatives=False``): the same report either way.

    Raises :class:`autoplan.InfeasiblePlanError` when nothing fits (with the least memory a layout was found
    to need per device, the capacity, and what to relax), ``ValueError`` when the pins admit no layout.

    Example:
        >>> from autoplan.synthetic import gpt_like_graph
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
    state = _Search(graph, cluster, options, deadline=start + limit_s)
    state.tables = LazyTables(graph, cluster, options)
    strategies = state.tables.strategies
    # Every strategy first gets a cheap bound from relaxed tables (≤ its exact lower bound); its full tables and
    # exact bounds are built only when that cheap bound comes up in the increasing order and still beats the
    # incumbent. Popping a heap of (bound, index), exact bounds replacing cheap ones as they surface, visits the
    # strategies in exactly the order of sorting them by their exact bounds.
    state.records = []
    heap = []
    for i in range(len(strategies)):
        cheap_s = lower_bound_s(state.tables.relaxed(i))
        state.records.append(_Record(cheap_s, 0.0, known=False))
        heap.append((cheap_s, i))
    heapq.heapify(heap)
    capacity = cluster.device.usable_memory_bytes

    def next_exact() -> int | None:
        """The memory-possible strategy of least exact lower bound not yet visited (None: none left)."""
        while heap:
            bound_s, i = heap[0]
            if state.records[i].known:
                heapq.heappop(heap)
                return i
            state.know(i)
            if _memory_possible(state, i, capacity):
                heapq.heapreplace(heap, (state.records[i].lower_bound_s, i))
            else:
                heapq.heappop(heap)
        return None

    # Upper bounds: greedy layouts, cheapest bound first.
    order: list[int] = []
    while heap:
        i = next_exact()
        if i is None:
            break
        # past the deadline the greedy layouts go on until one fits (each is cheap): a busy machine that spends the
        # time limit on tables still returns a plan, marked FEASIBLE with its gap, rather than none
        late = time.perf_counter() > state.deadline and state.best is not None
        if state.records[i].lower_bound_s >= state.best_s() or late:
            heapq.heappush(heap, (state.records[i].lower_bound_s, i))
            break
        order.append(i)
        if state.refined(i) >= state.best_s():
            continue
        found = greedy(state.tables[i])
        state.records[i].status = "greedy"
        if found is not None:
            state.offer(i, found[0], found[1], exact=False, status="greedy")
    while heap and heap[0][0] < state.best_s():  # every strategy whose exact bound is below the incumbent
        _, i = heapq.heappop(heap)
        if state.records[i].known:
            order.append(i)
        else:
            state.know(i)
            if _memory_possible(state, i, capacity):
                heapq.heappush(heap, (state.records[i].lower_bound_s, i))

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
        raise infeasible_error(state, strategies, limit_s)
    best_s = state.best_s()
    still_open = [lb for lb in unresolved if lb < best_s]
    gap = (best_s - min(still_open)) / best_s if still_open else 0.0
    rec = state.records[state.best]
    if options.recompute == "auto":  # a pinned recompute stays everywhere it was asked for
        rec.assignment, rec.cost = state.tables[state.best].without_needless_recompute(rec.assignment, rec.cost)
    state.frozen = True
    alternatives = LazyAlternatives(state)
    if not lazy_alternatives:
        alternatives.resolve()
    wall = time.perf_counter() - start
    info = SearchInfo(solver="cp-sat", status="OPTIMAL" if not still_open else "FEASIBLE", wall_s=wall,
                      candidates=len(strategies), gap=gap, alternatives=alternatives)
    return build_plan(graph, cluster, state.tables[state.best].strategy, state.records[state.best].assignment,
                      batch, info)


def _pipeline_notes(graph: ModelGraph) -> tuple[str, ...]:
    if not graph.pipeline_blocker:
        return ()
    return (f"pp=1: the executor cannot split {graph.model_name} into pipeline stages ({graph.pipeline_blocker}); "
            f"data and tensor parallelism do not need the split",)


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
                if strategy.sequence_parallel and sequence_parallel_applies(layer, strategy.tp):
                    tensor_parallel.update({f"{layer.name}.{norm}": "sequence"
                                            for norm in layer.sequence_parallel.norms})
        stages.append(Stage(tuple(names), tuple(recompute)))
    plan = Plan(
        model=ModelInfo(graph.model_name, graph.fingerprint, graph.num_params), cluster=cluster,
        global_batch_size=global_batch, microbatch_size=strategy.microbatch_size,
        microbatches=strategy.microbatches, mesh=Mesh(strategy.pp, strategy.dp, strategy.tp),
        schedule=strategy.schedule, data_parallel=strategy.data_parallel, stages=tuple(stages),
        tensor_parallel=tensor_parallel, precision=strategy.precision, optimizer=strategy.optimizer,
        virtual_stages=strategy.virtual_stages, sequence_parallel="sequence" in tensor_parallel.values(),
        fsdp_reshard=strategy.fsdp_reshard,
        search=replace(search_info, notes=search_info.notes + _pipeline_notes(graph) +
                       tensor_parallel_notes(graph, strategy.tp, tensor_parallel,
                                             strategy.data_parallel == "fsdp" and strategy.dp > 1)),
    )
    return plan.replace(predicted=estimate_breakdown(graph, plan).predicted)
