"""Lower bounds on one strategy's step time and memory: what lets the search prune without solving.

Every bound drops only terms that are ≥ 0, so no layout of the strategy beats it. The tail (data-parallel sync
+ optimizer) is the affine α + β·P of :func:`autoplan.cost.plan_cost.rank_tail_terms`, increasing in a rank's
parameters P, so its maximum over ranks is at least its value at the mean.

Example:
    >>> hull = LowerHull([(1.0, 4.0), (2.0, 2.0), (4.0, 1.0), (3.0, 3.0)])   # (bytes, seconds) choices
    >>> hull(0.5), hull(1.5), hull(10.0)      # too little memory; half of each of the two leanest; the fastest
    (inf, 3.0, 1.0)
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..cost.plan_cost import in_flight, rank_state_bytes

if TYPE_CHECKING:  # pragma: no cover
    from .tables import StrategyTables

__all__ = ["RefinedBound", "lower_bound_s", "refined_bound", "memory_lower_bound_bytes", "LowerHull"]


@dataclass(frozen=True)
class RefinedBound:
    """The memory-aware bound of one strategy, and the per-rank table it came from (the CP-SAT model's cuts).

    ``rank_need_s[r][n]``: the least seconds per microbatch pipeline rank r needs to run n of segment
    ``segment``'s layers beside its fixed layers (``inf``: they do not fit). Empty when the chain has no
    repeated layers (then the bound is :func:`lower_bound_s`).
    """

    bound_s: float
    segment: int | None = None
    rank_need_s: tuple[tuple[float, ...], ...] = ()
    segments: tuple[int, ...] = ()  # the segments whose layers n counts: ``segment`` and those counted as its layers


def _tail_s(tables: "StrategyTables", params: float) -> float:
    alpha_s, beta_s = tables.tail_terms
    return alpha_s + beta_s * params


def _leanest_params(tables: "StrategyTables") -> int:
    return sum(min(c.num_params for c in rows) * seg.size for rows, seg in zip(tables.choices, tables.segments))


def lower_bound_s(tables: "StrategyTables") -> float:
    """No layout of this strategy is faster: stages perfectly balanced at each layer's fastest choice, no
    pipeline sends, no memory limit, the tail at the mean of the leanest parameters.

    Example:
        >>> from autoplan.solve.tables import example_tables
        >>> t = example_tables(mesh={"pp": 2, "tp": 1}, microbatch_size=1)
        >>> 0 < lower_bound_s(t) <= refined_bound(t).bound_s
        True
    """
    s = tables.strategy
    fastest = [min(c.time_s for c in rows) for rows in tables.choices]
    total = sum(t * seg.size for t, seg in zip(fastest, tables.segments))
    per_mb = max(total / s.pp, max(fastest))
    return (s.microbatches + tables.bubble) * per_mb + _tail_s(tables, _leanest_params(tables) / s.pp)


def refined_bound(tables: "StrategyTables") -> RefinedBound:
    """A tighter bound that sees memory and whole layers; ``bound_s`` is ``inf`` when the strategy cannot fit.

    Relaxation: keep the segment with the most work (N identical layers) and, of the other layers, only the
    first (on rank 0) and the last (on the last stage's rank) at their fastest and leanest; let each of the N
    layers mix its choices fractionally. A segment none of whose choices beats that mix (on or above the hull φ_r
    below, for every rank) counts as more of the N layers (a sequence-parallel run's last block, which also pays
    the run's entry and exit): replacing a layer by a cheaper one only lowers the bound. Rank r, with in-flight count f_r, capacity C less its fixed bytes, and
    fixed seconds τ_r (its fixed layers, and one cheapest send per stage that is not the last), running n of the
    layers needs at least τ_r + n·φ_r(C_r/n) seconds per microbatch, where φ_r is the lower convex hull of the
    choices' (bytes σ·P_c + W_c + f_r·A_c, seconds t_c) points (σ = model-state bytes per parameter). Ranks hold
    whole layers, so the per-microbatch bound is the least t with Σ_r max{n : τ_r + n·φ_r(C_r/n) ≤ t} ≥ N,
    found by bisection. Interleaved (v stages per rank), the bubble's slowest stage is bounded the same way per
    stage, by time alone: the least s with Σ_k max{n : τ_k + n·t_min ≤ s} ≥ N (τ_k: the first or last layer at
    its fastest, the cheapest send of a stage that is not the last), at least the rank bound / v.

    Example:
        >>> from autoplan.solve.tables import example_tables
        >>> b = refined_bound(example_tables(mesh={"pp": 2, "tp": 1}, microbatch_size=1))
        >>> b.segment, len(b.rank_need_s), [row[0] < row[1] < row[2] for row in b.rank_need_s]   # 2 ranks, 4 blocks
        (2, 2, [True, True])
    """
    s = tables.strategy
    sized = [g for g, seg in enumerate(tables.segments) if seg.size > 1]
    base = lower_bound_s(tables)
    if not sized:
        return RefinedBound(base)
    g = max(sized, key=lambda j: (tables.segments[j].size * min(c.time_s for c in tables.choices[j]), -j))
    n_layers, rows = tables.segments[g].size, tables.choices[g]
    sigma = tables.state_bytes_per_param
    last_rank = (s.num_stages - 1) % s.pp
    min_send = min(tables.p2p_s) if s.num_stages > 1 else 0.0

    flights = tables.in_flight

    def fixed(r: int) -> tuple[float, float]:
        """(seconds, bytes) rank r pays outside the N layers, at least."""
        f = flights[r]
        t = min_send * (s.virtual_stages - (1 if r == last_rank else 0))
        m = 0.0
        ends = []
        if r == 0 and g != 0:
            ends.append(0)
        if r == last_rank and g != len(tables.segments) - 1:
            ends.append(len(tables.segments) - 1)
        for e in ends:
            t += min(c.time_s for c in tables.choices[e])
            m += min(c.fixed_bytes(sigma) + f * c.activation_bytes for c in tables.choices[e])
        if r == last_rank:
            m += tables.loss_bytes
        return t, m

    groups: dict[tuple, int] = {}  # ranks of one kind (in-flight count, fixed seconds, fixed bytes) → how many
    rank_keys = []
    for r in range(s.pp):
        key = (flights[r],) + fixed(r)
        rank_keys.append(key)
        groups[key] = groups.get(key, 0) + 1
    cap = float(tables.capacity_bytes)
    hulls = {key: LowerHull([(c.fixed_bytes(sigma) + key[0] * c.activation_bytes, c.time_s) for c in rows])
             for key in groups}
    counted = (g,) + tuple(h for h in range(1, len(tables.segments) - 1)
                           if h != g and _no_cheaper(tables.choices[h], sigma, hulls))
    n_layers = sum(tables.segments[h].size for h in counted)
    # need[key][n]: least seconds a rank of this kind needs to run n of the layers (inf: does not fit)
    need: dict[tuple, list[float]] = {}
    finite = []  # the candidate limits, gathered as arrays (a set of ~20 × N floats built in Python costs more)
    n = np.arange(1, n_layers + 1, dtype=np.float64)
    for key in groups:
        f, fixed_s, fixed_bytes = key
        phi = hulls[key]
        budget = cap - fixed_bytes
        if budget >= 0:
            row = fixed_s + n * phi.at(budget / n)
            finite.append(row[np.isfinite(row)])
            need[key] = [fixed_s] + row.tolist()
        else:
            need[key] = [float("inf")] * (n_layers + 1)
    rank_need = tuple(tuple(need[key]) for key in rank_keys)
    least = _least_enough(groups, need, n_layers, np.unique(np.concatenate(finite)).tolist() if finite else [])
    if least is None:
        return RefinedBound(float("inf"), g, rank_need, counted)
    per_mb = least * (1 - 1e-9)  # a margin for the float sums of the exact cost
    tail_s = _tail_s(tables, _leanest_params(tables) / s.pp)
    if s.virtual_stages > 1:  # M·t_max + b·s_max, s_max ≥ t_max / v and ≥ the stage bound
        stage_s = _least_stage_s(tables, g, n_layers, min_send) * (1 - 1e-9)
        step_s = s.microbatches * per_mb + s.bubble_stage_times * max(per_mb / s.virtual_stages, stage_s)
    else:
        step_s = (s.microbatches + tables.bubble) * per_mb
    return RefinedBound(max(base, step_s + tail_s), g, rank_need, counted)


def _no_cheaper(rows: list, sigma: float, hulls: dict[tuple, "LowerHull"]) -> bool:
    """Whether no choice in ``rows`` lies below any of the hulls φ (each key's first entry: the in-flight count
    its bytes are taken at), so that a layer of these rows may be counted as one of the hulls' layers."""
    for key, phi in hulls.items():
        for c in rows:
            if phi(c.fixed_bytes(sigma) + key[0] * c.activation_bytes) > c.time_s:
                return False
    return True


def _least_stage_s(tables: "StrategyTables", g: int, n_layers: int, min_send: float) -> float:
    """The least time s of the slowest stage: stages hold ``n_layers`` layers at segment ``g``'s fastest time
    between them, the first stage also the chain's first layer and the last stage its last, each stage but the
    last one send (time alone, no memory)."""
    s = tables.strategy
    t_min = min(c.time_s for c in tables.choices[g])
    first = min(c.time_s for c in tables.choices[0]) if g != 0 else 0.0
    last = min(c.time_s for c in tables.choices[-1]) if g != len(tables.segments) - 1 else 0.0
    kinds: dict[float, int] = {}
    for k in range(s.num_stages):
        fixed_s = (first if k == 0 else 0.0) + (last if k == s.num_stages - 1 else 0.0) + \
            (min_send if k < s.num_stages - 1 else 0.0)
        kinds[fixed_s] = kinds.get(fixed_s, 0) + 1
    n = np.arange(0, n_layers + 1, dtype=np.float64)
    need = {key: (key + n * t_min).tolist() for key in kinds}
    least = _least_enough(kinds, need, n_layers)
    return least if least is not None else 0.0


def _least_enough(groups: dict[tuple, int], need: dict[tuple, list[float]], n_layers: int,
                  values: list[float] | None = None) -> float | None:
    """The least per-microbatch time at which the ranks together can hold all ``n_layers`` (None: never).
    ``values``: the distinct finite entries of the rows past n = 0, ascending, when the caller has them."""
    if values is None:
        values = sorted({v for row in need.values() for v in row[1:] if v != float("inf")})

    def enough(limit_s: float) -> bool:
        total = 0
        for key, count in groups.items():
            most = bisect_right(need[key], limit_s) - 1  # rows are non-decreasing in n
            if most < 0:
                return False  # this rank's fixed layers alone take longer
            total += count * most
        return total >= n_layers

    if not values or not enough(values[-1]):
        return None
    lo_i, hi_i = 0, len(values) - 1  # the least value that is enough
    while lo_i < hi_i:
        mid = (lo_i + hi_i) // 2
        if enough(values[mid]):
            hi_i = mid
        else:
            lo_i = mid + 1
    return values[lo_i]


def memory_lower_bound_bytes(tables: "StrategyTables") -> float:
    """No layout of this strategy needs less memory on its fullest device: leanest choices, perfectly
    balanced parameters and activations, the smallest in-flight count.

    Example:
        >>> from autoplan.solve.tables import example_tables
        >>> t = example_tables(mesh={"pp": 2, "tp": 1}, microbatch_size=1)
        >>> 0 < memory_lower_bound_bytes(t) <= max(t.evaluate([[(i, t.choices[t.segment_of[i]][0].choice)
        ...     for i in range(a, b)] for a, b in ((0, 4), (4, 8))]).peak_memory_bytes)
        True
    """
    s = tables.strategy
    pairs = list(zip(tables.choices, tables.segments))
    params = _leanest_params(tables)
    act = sum(min(c.activation_bytes for c in rows) * seg.size for rows, seg in pairs)
    copies = sum(min(c.copy_bytes for c in rows) * seg.size for rows, seg in pairs)
    state = rank_state_bytes(s, int(params // s.pp))
    flight = min(in_flight(s, r) for r in (0, s.pp - 1))
    return state + (flight * act + copies) / s.pp


class LowerHull:
    """φ(x): the least average seconds of a fractional mix of (bytes, seconds) choices whose average bytes are
    at most x (the lower convex hull of the points, non-increasing; inf below the leanest point)."""

    def __init__(self, points: list[tuple[float, float]]):
        pareto: list[tuple[float, float]] = []
        for m, t in sorted(points):
            if not pareto or t < pareto[-1][1]:
                pareto.append((m, t))
        hull: list[tuple[float, float]] = []
        for p in pareto:
            while len(hull) >= 2:
                (m1, t1), (m2, t2) = hull[-2], hull[-1]
                # drop hull[-1] when it lies on or above the chord from hull[-2] to p
                if (t2 - t1) * (p[0] - m1) >= (p[1] - t1) * (m2 - m1):
                    hull.pop()
                else:
                    break
            hull.append(p)
        self.hull = hull

    def at(self, xs: np.ndarray) -> np.ndarray:
        """φ at every point of ``xs`` at once: the same float operations as :meth:`__call__`, so the same values.

        Example:
            >>> LowerHull([(1.0, 4.0), (2.0, 2.0), (4.0, 1.0)]).at(np.array([0.5, 1.5, 3.0, 10.0])).tolist()
            [inf, 3.0, 1.5, 1.0]
        """
        m = np.array([p[0] for p in self.hull])
        t = np.array([p[1] for p in self.hull])
        if len(m) == 1:
            return np.where(xs < m[0], np.inf, t[0])
        right = np.searchsorted(m, xs, side="right")  # hull[right] is the first point beyond x
        inner = np.minimum(np.maximum(right, 1), len(m) - 1)  # np.clip's dispatch costs more on short arrays
        m1, t1, m2, t2 = m[inner - 1], t[inner - 1], m[inner], t[inner]
        with np.errstate(divide="ignore", invalid="ignore"):
            mixed = t1 + (t2 - t1) * (xs - m1) / (m2 - m1)
        return np.where(right == 0, np.inf, np.where(right >= len(m), t[-1], mixed))

    def __call__(self, x: float) -> float:
        hull = self.hull
        if x < hull[0][0]:
            return float("inf")
        for (m1, t1), (m2, t2) in zip(hull, hull[1:]):
            if x < m2:
                return t1 + (t2 - t1) * (x - m1) / (m2 - m1)
        return hull[-1][1]
