"""What the search says besides its plan: the best layouts it did not choose, each with why it lost, and the
error when nothing fits.

For ``plan.explain()``: the best layout of up to three other meshes (and pure data parallelism), of each other
schedule and of the other data-parallel kind on the chosen mesh, of the chosen strategy with FSDP's other
``fsdp_reshard`` (where both can run and it is not pinned; labelled ``…, fsdp_reshard='step'`` or
``'microbatch'``), and of the chosen strategy without recompute, each solved briefly
(:data:`ALTERNATIVE_TIME_LIMIT_S` of CP-SAT's deterministic time) unless the search already knows it; these
solves are independent and run side by side, one thread each. They are judged when first read
(:class:`LazyAlternatives`, the value of ``plan.search.alternatives``): a plan that is only applied never pays for
them, and the report is the same whenever it is read, because the search's state is frozen once the plan is
chosen. When no layout fits, :class:`autoplan.InfeasiblePlanError` quotes the leanest layout found, the
capacity and what to relax.

Example:
    >>> import autoplan
    >>> from autoplan.synthetic import gpt_like_graph
    >>> from autoplan.solve import search
    >>> from autoplan.options import PlanOptions
    >>> plan = search(gpt_like_graph(layers=2, hidden=256, seq=128, vocab=1000),
    ...               autoplan.Cluster.preset("a100-80gb"), PlanOptions(global_batch_size=64, mesh={"pp": 2}))
    >>> all(a.step_time_s is None or a.step_time_s >= plan.predicted.step_time_s for a in plan.search.alternatives)
    True
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

from ..cluster import Cluster
from ..cost.plan_cost import PlanCost, Strategy
from ..errors import InfeasiblePlanError
from ..explain import format_bytes, format_seconds
from ..plan import Alternative
from ..vocabulary import SCHEDULES
from .bounds import refined_bound
from .cpsat import solve_strategy
from .greedy import greedy, leanest
from .tables import StrategyTables

if TYPE_CHECKING:  # pragma: no cover
    from . import _Search

__all__ = ["ALTERNATIVE_TIME_LIMIT_S", "LazyAlternatives", "judge_alternatives", "infeasible_error"]

#: CP-SAT deterministic time for each alternative the search has not solved already.
ALTERNATIVE_TIME_LIMIT_S = 0.1


class LazyAlternatives(Sequence):
    """``plan.search.alternatives`` judged on first read: a read-only sequence of :class:`Alternative` that
    equals, copies, pickles and serialises as the tuple :func:`judge_alternatives` returns.

    The search hands over its state once the plan is chosen (``frozen``: nothing may change which plan won), and
    nothing else writes to it, so the report does not depend on when it is read; the state is released after.

    Example:
        >>> lazy = LazyAlternatives.of((Alternative("pp2×dp4×tp1 1f1b mb=1×2 ddp", 1.5, "+50.0% step time"),))
        >>> len(lazy), lazy[0].step_time_s, lazy == (lazy[0],)
        (1, 1.5, True)
    """

    def __init__(self, state: "_Search"):
        if not state.frozen:
            raise ValueError("alternatives are judged only once the search has chosen its plan (state.frozen)")
        self._state: "_Search | None" = state
        self._items: tuple[Alternative, ...] | None = None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, items: tuple[Alternative, ...]) -> "LazyAlternatives":
        """An already judged report (for examples and tests)."""
        lazy = cls.__new__(cls)
        lazy._state, lazy._items, lazy._lock = None, tuple(items), threading.Lock()
        return lazy

    @property
    def judged(self) -> bool:
        """Whether the alternatives have been judged yet."""
        return self._items is not None

    def resolve(self) -> tuple[Alternative, ...]:
        """The alternatives as a tuple (judged now if not yet)."""
        with self._lock:
            if self._items is None:
                self._items = tuple(judge_alternatives(self._state))
                self._state = None  # the tables of every strategy are no longer needed
            return self._items

    def __len__(self) -> int:
        return len(self.resolve())

    def __getitem__(self, index):
        return self.resolve()[index]

    def __iter__(self):
        return iter(self.resolve())

    def __eq__(self, other) -> bool:
        if isinstance(other, LazyAlternatives):
            other = other.resolve()
        return isinstance(other, tuple) and self.resolve() == other

    def __hash__(self) -> int:
        return hash(self.resolve())

    def __repr__(self) -> str:
        return repr(self.resolve())

    def __copy__(self) -> tuple[Alternative, ...]:
        return self.resolve()

    def __deepcopy__(self, memo) -> tuple[Alternative, ...]:  # dataclasses.asdict deep-copies field values
        return self.resolve()

    def __reduce__(self):  # pickles as the plain tuple: no search state travels
        return (tuple, (self.resolve(),))


def judge_alternatives(state: "_Search") -> list[Alternative]:
    """The best layout of other meshes, schedules, the other DP kind, the other FSDP resharding, and without
    recompute, each with why it lost."""
    state.complete()
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
    twin = _fsdp_reshard_twin(state, same_mesh, chosen)
    if twin:
        groups.append(("fsdp_reshard", twin))
    # The groups share no strategy, so their CP-SAT solves are independent: each is deterministic (one worker,
    # deterministic time), and they run side by side on the machine's cores, then are recorded in group order.
    picks = [_pick(state, members) for _, members in groups]
    solve = [i for i in picks if i is not None and not state.records[i].exact]
    uses_recompute = any(choice.recompute is not None for stage in state.records[chosen_i].assignment
                         for _, choice in stage)
    lean = _no_recompute_tables(state, chosen_i) if uses_recompute and state.options.recompute == "auto" else None
    with ThreadPoolExecutor(max_workers=max(1, min(len(solve) + 1, os.cpu_count() or 1))) as pool:
        solving = {i: pool.submit(state.solve_model, i, ALTERNATIVE_TIME_LIMIT_S, False) for i in solve}
        lean_solve = pool.submit(_solve_lean, *lean) if lean is not None else None
        for i in solve:
            state.take(i, solving[i].result())
        lean_result = lean_solve.result() if lean_solve is not None else None
    judged = [(kind, _judged(state, i, members, best, _reshard_suffix(state, members) if kind == "fsdp_reshard"
                             else "")) for (kind, members), i in zip(groups, picks)]
    meshes = sorted((a for kind, a in judged if kind == "mesh" and a is not None),
                    key=lambda a: (a.step_time_s is None, a.step_time_s or 0.0))
    out = meshes + [a for kind, a in judged if kind != "mesh"]
    if lean is not None:
        out.append(_without_recompute(state, chosen_i, best, lean, lean_result))
    return [a for a in out if a is not None]


def _fsdp_reshard_twin(state: "_Search", same_mesh: list[int], chosen: Strategy) -> list[int]:
    """The chosen strategy with FSDP's other way between microbatches (``Plan.fsdp_reshard``: keep the gathered
    weights through the step, or reshard every microbatch), as one group; empty where the search has no such
    strategy: DDP, dp = 1, a pipeline or one microbatch (where the two run alike, or only one can run:
    :func:`autoplan.cost.check_fsdp_reshard`), or ``fsdp_reshard`` pinned (like a pinned mesh or schedule, a pin
    leaves nothing to compare)."""
    if chosen.data_parallel != "fsdp":
        return []
    other = replace(chosen, fsdp_reshard="step" if chosen.fsdp_reshard == "microbatch" else "microbatch")
    return [i for i in same_mesh if state.tables[i].strategy == other]


def _reshard_suffix(state: "_Search", twin: list[int]) -> str:
    """What names the FSDP twin beside its description: the plan key and value that pin its mode."""
    return f", fsdp_reshard={state.tables[twin[0]].strategy.fsdp_reshard!r}"


def _known_s(state: "_Search", i: int) -> float:
    rec = state.records[i]
    return rec.cost.step_time_s if rec.cost is not None else rec.lower_bound_s + 1e9 * (rec.status == "memory")


def _pick(state: "_Search", members: list[int]) -> int | None:
    """The most promising strategy of ``members`` (a known layout, else the least refined bound), with a greedy
    layout as its incumbent."""
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
            found = greedy(state.tables[pick])
            if found is not None:
                state.offer(pick, found[0], found[1], exact=False, status="greedy")
        state.refined_bound(pick)  # known before its solve starts, so the solve only reads the state
    return pick


def _judged(state: "_Search", pick: int | None, members: list[int], best: PlanCost,
            suffix: str = "") -> Alternative | None:
    """How the picked strategy of ``members`` (solved by now) compares with the chosen plan (``suffix`` follows its
    description)."""
    if pick is not None:
        rec = state.records[pick]
        if rec.cost is not None:
            return Alternative(state.tables[pick].strategy.describe() + suffix, rec.cost.step_time_s,
                               _why_slower(rec.cost, best, state.tables[pick].strategy, state.cluster))
    i = min(members, key=lambda j: (state.records[j].memory_lower_bound_bytes, j))
    return Alternative(state.tables[i].strategy.describe() + suffix, None, _why_no_fit(state.tables[i]))


def _no_recompute_tables(state: "_Search", i: int) -> tuple:
    """(tables of strategy ``i`` without recompute, their greedy layout or None, their refined bound)."""
    t = state.tables[i]
    tables = StrategyTables(t.graph, t.cluster, t.strategy, t.segments, t.cache, "none", t.global_batch_size)
    return tables, greedy(tables), refined_bound(tables)


def _solve_lean(tables: StrategyTables, start, bound):
    return solve_strategy(tables, bound, cutoff_s=None, hint=start[0] if start else None,
                          time_limit_s=ALTERNATIVE_TIME_LIMIT_S)


def _without_recompute(state: "_Search", i: int, best: PlanCost, lean: tuple, result) -> Alternative | None:
    t = state.tables[i]
    tables, start, _ = lean
    label = t.strategy.describe() + ", no recompute"
    found = [tables.evaluate(result.assignment)] if result.assignment is not None else []
    found += [start[1]] if start else []
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
    _, lean = leanest(tables)
    need = max(lean.peak_memory_bytes)
    if need <= tables.capacity_bytes:
        return f"no layout found faster within the time limit (leanest layout needs {format_bytes(need)})"
    return f"needs {format_bytes(need)} > {format_bytes(tables.capacity_bytes)} per device"


def infeasible_error(state: "_Search", strategies: list[Strategy], time_limit_s: float) -> InfeasiblePlanError:
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
        _, cost = leanest(state.tables[i])
        if lean_cost is None or max(cost.peak_memory_bytes) < max(lean_cost.peak_memory_bytes):
            lean_i, lean_cost = i, cost
    need = max(lean_cost.peak_memory_bytes)
    o = state.options
    if need <= capacity:  # the search ran out of time before it proved or found anything
        return InfeasiblePlanError(
            f"no layout of {state.graph.model_name} was found within time_limit_s={time_limit_s:g}, although one fits "
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
