"""Simple layouts of one strategy: the greedy upper bound the CP-SAT search starts from, and the leanest layout
that error messages quote.

For each "level" ℓ, every layer takes its ℓ-th fastest non-dominated choice (ℓ = 0: fastest, the last:
leanest); stages are then cut by binary search on the per-stage time limit, filling each stage while its
device memory still fits (one stage per rank), by balancing time, and by spreading the longest run of layers of
one kind (the blocks) evenly over the stages.

Example:
    >>> from autoplan.solve.tables import example_tables
    >>> tables = example_tables(mesh={"pp": 2, "tp": 1}, microbatch_size=1)
    >>> assignment, cost = greedy(tables)
    >>> [len(stage) for stage in assignment], cost.fits        # 8 layers over 2 stages
    ([4, 4], True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..cost.plan_cost import PlanCost
from .space import LayerChoice

if TYPE_CHECKING:  # pragma: no cover
    from .tables import Assignment, ChoiceCost, StrategyTables

__all__ = ["greedy", "leanest"]


def greedy(tables: "StrategyTables") -> tuple["Assignment", PlanCost] | None:
    """The best feasible layout among a few simple ones (see the module docstring), or None."""
    best: tuple[Assignment, PlanCost] | None = None
    levels = max(len(c) for c in tables.choices)
    for level in range(levels):
        picks = [tables.choices[g][min(level, len(tables.choices[g]) - 1)] for g in tables.segment_of]
        picks = _untie(tables, picks)
        for assignment in _partitions(tables, picks):
            result = tables.evaluate(assignment)
            if result.fits and (best is None or result.step_time_s < best[1].step_time_s):
                best = (assignment, result)
    return best


def leanest(tables: "StrategyTables") -> tuple["Assignment", PlanCost]:
    """A layout built for least memory (leanest choices, stages cut to balance memory); for error messages.

    Example:
        >>> from autoplan.solve.tables import example_tables
        >>> tables = example_tables(mesh={"pp": 2, "tp": 1}, microbatch_size=1)
        >>> max(leanest(tables)[1].peak_memory_bytes) <= max(greedy(tables)[1].peak_memory_bytes)
        True
    """
    picks = _untie(tables, [min(tables.choices[g], key=lambda c: (c.activation_bytes + c.num_params, c.time_s))
                            for g in tables.segment_of])
    results = [(a, tables.evaluate(a)) for a in _partitions(tables, picks, memory_first=True)]
    return min(results, key=lambda ar: (max(ar[1].peak_memory_bytes), ar[1].step_time_s))


def _untie(tables: "StrategyTables", picks: list["ChoiceCost"]) -> list["ChoiceCost"]:
    """Make the layers of each tied group agree: all sharded or none, whichever is faster in total."""
    for segs in tables.tied_segments:
        layers = [i for i, g in enumerate(tables.segment_of) if g in segs]
        if len({picks[i].choice.tp_on for i in layers}) > 1:
            options = []
            for tp_on in (True, False):
                row = {i: next(c for c in tables.choices[tables.segment_of[i]]
                               if c.choice == LayerChoice(tp_on, picks[i].choice.recompute)) for i in layers}
                options.append((sum(c.time_s for c in row.values()), not tp_on, row))
            for i, c in min(options, key=lambda o: o[:2])[2].items():
                picks[i] = c
    return picks


def _partitions(tables: "StrategyTables", picks: list["ChoiceCost"],
                memory_first: bool = False) -> list["Assignment"]:
    s = tables.strategy
    stages = s.num_stages
    times = [p.time_s + tables.p2p_s[i] for i, p in enumerate(picks)]
    sigma = tables.state_bytes_per_param
    # stages k and k + pp share a rank, so they share a row (read only)
    per_rank = [[p.fixed_bytes(sigma) + tables.in_flight[r] * p.activation_bytes for p in picks]
                for r in range(min(s.pp, stages))]
    mem = [per_rank[k % s.pp] for k in range(stages)]
    out = [_balanced(tables, picks, mem[0] if memory_first else times)]
    even = None if memory_first else _even_cuts(tables)
    if even is not None:
        out.append(_assign(even, picks))
    if s.virtual_stages == 1 and stages > 1:
        cap = float("inf") if memory_first else tables.capacity_bytes
        cut = _threshold_cuts(tables, times, mem, picks, mem if memory_first else None, cap)
        if cut is not None:
            out.append(cut)
    return out


def _balanced(tables: "StrategyTables", picks: list["ChoiceCost"], weights: list[float]) -> "Assignment":
    """Cut where the running sum of ``weights`` crosses multiples of total / stages."""
    n, stages = tables.num_layers, tables.strategy.num_stages
    total = sum(weights) or 1.0
    cuts, acc, k = [0], 0.0, 1
    for i, w in enumerate(weights):
        acc += w
        remaining_layers, remaining_stages = n - (i + 1), stages - k
        if k < stages and (acc >= total * k / stages or remaining_layers == remaining_stages):
            if remaining_layers >= remaining_stages:
                cuts.append(i + 1)
                k += 1
    cuts.append(n)
    return _assign(cuts, picks)


def _even_cuts(tables: "StrategyTables") -> list[int] | None:
    """Cuts that spread the chain's longest run of layers of one kind (a transformer's blocks) evenly over the
    stages, the layers before and after it joining the first and the last stage; None when the run is shorter
    than the stages are many."""
    layers, segments, n = tables.graph.layers, tables.segments, tables.num_layers
    stages = tables.strategy.num_stages
    g = max(range(len(segments)), key=lambda j: (segments[j].size, -j))
    kind = layers[segments[g].start].kind
    start, stop = segments[g].start, segments[g].stop
    while start > 0 and layers[start - 1].kind == kind:
        start -= 1
    while stop < n and layers[stop].kind == kind:
        stop += 1
    run = stop - start
    if stages < 2 or run < stages:
        return None
    return [0] + [start + (k * run + stages // 2) // stages for k in range(1, stages)] + [n]


def _threshold_cuts(tables: "StrategyTables", times: list[float], mem: list[list[float]],
                    picks: list["ChoiceCost"], weights: list[list[float]] | None,
                    cap: float) -> "Assignment | None":
    """Binary search on a per-stage limit of time (or memory when ``weights``) under the memory cap."""
    n, stages = tables.num_layers, tables.strategy.num_stages
    margin = 2 * max(tables.boundary_bytes) + max(p.transient_bytes for p in picks)

    def fill(limit: float) -> list[int] | None:
        cuts, k, t, m = [0], 0, 0.0, 0.0
        for i in range(n):
            w = weights[k][i] if weights else times[i]
            over = (t + w > limit) or (m + mem[k][i] + margin > cap)
            if over and i > cuts[-1]:
                cuts.append(i)
                k += 1
                if k >= stages:
                    return None
                t, m = 0.0, 0.0
            t += weights[k][i] if weights else times[i]
            m += mem[k][i]
            if m + margin > cap:
                return None
        cuts.append(n)
        while len(cuts) - 1 < stages:  # split the longest stage until there are enough
            j = max(range(len(cuts) - 1), key=lambda s: (cuts[s + 1] - cuts[s], -s))
            if cuts[j + 1] - cuts[j] < 2:
                return None
            cuts.insert(j + 1, (cuts[j] + cuts[j + 1]) // 2)
        return cuts

    lo = 0.0
    hi = sum(weights[0]) if weights else sum(times)
    best = fill(hi)
    if best is None:
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        cuts = fill(mid)
        if cuts is None:
            lo = mid
        else:
            hi, best = mid, cuts
    return _assign(best, picks)


def _assign(cuts: list[int], picks: list["ChoiceCost"]) -> "Assignment":
    return [[(i, picks[i].choice) for i in range(a, b)] for a, b in zip(cuts, cuts[1:])]
