"""Per-strategy cost tables, the exact lower bound and the greedy layout that the CP-SAT search starts from.

Identical neighbouring layers (same structure and figures, e.g. the transformer blocks) form one *segment*:
they have identical costs, so the solver only decides how many of a segment's layers each stage takes and
how many of those use each choice. Choices dominated in every cost term (slower, more parameters, more
activations, more transient memory, a larger weight copy) are dropped: keeping the dominating one never costs
anything.

Example:
    >>> from autoplan.solve.tables import segments_of
    >>> callable(segments_of)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from bisect import bisect_right
from functools import cached_property
from typing import Sequence

from .. import cost
from ..cluster import Cluster
from ..cost.plan_cost import (PlanCost, Strategy, compose, fsdp_gather_bytes, in_flight, layer_choice_cost, loss_bytes,
                       rank_state_bytes, rank_tail_s, stage_p2p_s, weight_copy_bytes_per_param)
from ..graph import Layer, ModelGraph
from .space import LayerChoice, layer_choices

__all__ = ["Segment", "segments_of", "LayerCostCache", "StrategyTables", "Assignment"]

#: Per stage, the (layer index, choice) pairs it runs, in model order.
Assignment = list[list[tuple[int, LayerChoice]]]


def _signature(layer: Layer) -> tuple:
    return (layer.kind, layer.forward_flops, layer.backward_flops, layer.num_params, layer.param_bytes,
            layer.activation_bytes, layer.output_bytes, layer.tp_groups and tuple(
                (g.divisor, g.num_params, g.forward_flops, g.activation_bytes, g.output_bytes,
                 tuple(sorted(g.styles.values()))) for g in layer.tp_groups),
            tuple((o.module == layer.name, o.saved_activation_bytes, o.forward_flops)
                  for o in layer.recompute_options))


@dataclass(frozen=True)
class Segment:
    """Layers ``start..stop-1`` of the chain, all with the same signature."""

    start: int
    stop: int
    signature: tuple

    @property
    def size(self) -> int:
        return self.stop - self.start


def segments_of(layers: Sequence[Layer]) -> list[Segment]:
    """Maximal runs of neighbouring layers with equal signatures."""
    out: list[Segment] = []
    for i, layer in enumerate(layers):
        sig = _signature(layer)
        if out and out[-1].signature == sig:
            out[-1] = Segment(out[-1].start, i + 1, sig)
        else:
            out.append(Segment(i, i + 1, sig))
    return out


class LayerCostCache:
    """``layer_choice_cost`` memoised by (layer signature, strategy fields it reads, choice)."""

    def __init__(self, graph: ModelGraph, cluster: Cluster):
        self.graph, self.cluster = graph, cluster
        self._memo: dict[tuple, cost.LayerCost] = {}

    def get(self, layer: Layer, signature: tuple, strategy: Strategy, choice: LayerChoice) -> cost.LayerCost:
        key = (signature, strategy.tp if choice.tp_on else 1, strategy.microbatch_size, strategy.precision,
               choice.recompute)
        hit = self._memo.get(key)
        if hit is None:
            hit = layer_choice_cost(self.graph, layer, self.cluster, strategy, choice.tp_on, choice.option(layer))
            self._memo[key] = hit
        return hit


@dataclass(frozen=True)
class ChoiceCost:
    """One segment choice under one strategy: the figures the solver's constraints read."""

    choice: LayerChoice
    layer_cost: cost.LayerCost
    time_s: float
    num_params: int
    activation_bytes: int
    transient_bytes: int
    copy_bytes: int = 0  # autocast's low-precision copy of the layer's matmul weights (once per rank, not per
    # microbatch: it sits beside the model states)

    def fixed_bytes(self, sigma: float) -> float:
        """Bytes the layer adds to its rank whatever the in-flight count: model states and the weight copy."""
        return sigma * self.num_params + self.copy_bytes


class StrategyTables:
    """Everything the search needs about one strategy, computed once."""

    def __init__(self, graph: ModelGraph, cluster: Cluster, strategy: Strategy, segments: list[Segment],
                 cache: LayerCostCache, recompute: str, global_batch_size: int):
        """Cost every allowed choice of every segment under ``strategy`` (memoised across strategies)."""
        self.graph, self.cluster, self.strategy, self.segments = graph, cluster, strategy, segments
        self.cache, self.global_batch_size = cache, global_batch_size
        self.capacity_bytes = cluster.device.usable_memory_bytes
        self.num_layers = len(graph.layers)
        self.segment_of = [g for g, seg in enumerate(segments) for _ in range(seg.size)]
        # (segment g, per rank: least seconds per microbatch to run n of g's layers), set by
        # refined_lower_bound_s; the CP-SAT model uses it as a cut.
        self.rank_need: tuple[int, list[list[float]]] | None = None
        self._refined: float | None = None
        # Layers sharing a tied weight must agree on tensor parallelism (one tensor, one placement): a tied
        # segment keeps all its choices (no dominance pruning) so that either decision stays available, and a
        # group that cannot shard everywhere is not sharded anywhere.
        self.tied_segments: list[list[int]] = []
        no_tp: set[int] = set()
        for group in tied_layer_groups(graph):
            segs = sorted({self.segment_of[i] for i in group})
            shardable = [any(c.tp_on for c in layer_choices(graph.layers[i], strategy.tp, recompute)) for i in group]
            if not all(shardable) or any(segments[g].size > 1 for g in segs):
                no_tp.update(segs)
            elif len(segs) > 1:
                self.tied_segments.append(segs)
        tied = {g for segs in self.tied_segments for g in segs}
        self.choices: list[list[ChoiceCost]] = []
        for g, seg in enumerate(segments):
            layer = graph.layers[seg.start]
            rows = []
            for choice in layer_choices(layer, strategy.tp, recompute):
                if choice.tp_on and g in no_tp:
                    continue
                lc = cache.get(layer, seg.signature, strategy, choice)
                rows.append(ChoiceCost(choice, lc, lc.total_s, lc.num_params, lc.activation_bytes,
                                       lc.transient_bytes + fsdp_gather_bytes(strategy, lc.num_params),
                                       weight_copy_bytes_per_param(strategy) * lc.matmul_params))
            self.choices.append(_sorted(rows) if g in tied else _non_dominated(rows))
        self.bubble = strategy.bubble_stage_times / strategy.virtual_stages  # rank-times, balanced stages
        # The loss buffers sit on the last stage's rank; the final layer's output is the same for every choice.
        self.last_rank = (strategy.num_stages - 1) % strategy.pp
        self.loss_bytes = loss_bytes(strategy, self.choices[-1][0].layer_cost)

    @cached_property
    def boundary_bytes(self) -> list[int]:
        """Bytes a cut after layer i sends (the same for every choice of a layer)."""
        per_segment = [rows[0].layer_cost.boundary_bytes for rows in self.choices]
        return [per_segment[g] for g in self.segment_of]

    @cached_property
    def p2p_s(self) -> list[float]:
        """Send time of a cut after layer i, for one microbatch (forward activation + backward gradient)."""
        per_segment = [stage_p2p_s(self.strategy, self.cluster, rows[0].layer_cost.boundary_bytes)
                       for rows in self.choices]
        return [per_segment[g] for g in self.segment_of]

    @cached_property
    def in_flight(self) -> list[float]:
        return [in_flight(self.strategy, r) for r in range(self.strategy.pp)]

    # -- bounds ---------------------------------------------------------------------------------------------
    def lower_bound_s(self) -> float:
        """No layout of this strategy is faster: stages perfectly balanced at each layer's fastest choice,
        no pipeline sends, no memory limit; the tail (DP sync + optimizer) is affine and increasing in a
        rank's parameters, so its maximum over ranks is at least its value at the mean."""
        s = self.strategy
        fastest = [min(c.time_s for c in rows) for rows in self.choices]
        total = sum(t * seg.size for t, seg in zip(fastest, self.segments))
        per_mb = max(total / s.pp, max(fastest))
        params = sum(min(c.num_params for c in rows) * seg.size
                     for rows, seg in zip(self.choices, self.segments)) / s.pp
        sync, opt = rank_tail_s(s, self.cluster, params)
        return (s.microbatches + self.bubble) * per_mb + sync + opt

    def refined_lower_bound_s(self) -> float:
        """A tighter bound that sees memory and whole layers; ``inf`` when the strategy cannot fit.

        Relaxation: keep the segment with the most work (N identical layers) and, of the other layers, only
        the first (on rank 0) and the last (on the last stage's rank) at their fastest and leanest; let each
        of the N layers mix its choices fractionally. Rank r, with in-flight count f_r, capacity C less its
        fixed bytes, and fixed seconds τ_r (its fixed layers, and one cheapest send per stage that is not the
        last), running n of the layers needs at least τ_r + n·φ_r(C_r/n) seconds per microbatch, where φ_r is
        the lower convex hull of the choices' (bytes σ·P_c + f_r·A_c, seconds t_c) points (σ = model-state
        bytes per parameter). Ranks hold whole layers, so the per-microbatch bound is the least t with
        Σ_r max{n : τ_r + n·φ_r(C_r/n) ≤ t} ≥ N, found by bisection. Every dropped term is ≥ 0.
        """
        s = self.strategy
        sized = [g for g, seg in enumerate(self.segments) if seg.size > 1]
        base = self.lower_bound_s()
        if not sized:
            return base
        if self._refined is not None:
            return self._refined
        g = max(sized, key=lambda j: (self.segments[j].size * min(c.time_s for c in self.choices[j]), -j))
        n_layers, rows = self.segments[g].size, self.choices[g]
        sigma = rank_state_bytes(s, 10**9) / 10**9
        stages, last_rank = s.num_stages, (s.num_stages - 1) % s.pp
        min_send = min(self.p2p_s) if stages > 1 else 0.0

        def fixed(r: int) -> tuple[float, float]:
            """(seconds, bytes) rank r pays outside the N layers, at least."""
            f = in_flight(s, r)
            t = min_send * (s.virtual_stages - (1 if r == last_rank else 0))
            m = 0.0
            ends = []
            if r == 0 and g != 0:
                ends.append(0)
            if r == last_rank and g != len(self.segments) - 1:
                ends.append(len(self.segments) - 1)
            for e in ends:
                t += min(c.time_s for c in self.choices[e])
                m += min(c.fixed_bytes(sigma) + f * c.activation_bytes for c in self.choices[e])
            if r == last_rank:
                m += self.loss_bytes
            return t, m

        groups: dict[tuple, int] = {}
        rank_keys = []
        for r in range(s.pp):
            key = (in_flight(s, r),) + fixed(r)
            rank_keys.append(key)
            groups[key] = groups.get(key, 0) + 1
        cap = float(self.capacity_bytes)
        # need[key][n]: least seconds a rank of this kind needs to run n of the layers (inf: does not fit)
        need: dict[tuple, list[float]] = {}
        for key in groups:
            f, fixed_s, fixed_bytes = key
            phi = _LowerHull([(c.fixed_bytes(sigma) + f * c.activation_bytes, c.time_s) for c in rows])
            budget = cap - fixed_bytes
            row = [fixed_s if budget >= 0 else float("inf")]
            for n in range(1, n_layers + 1):
                row.append(fixed_s + n * phi(budget / n) if budget >= 0 else float("inf"))
            need[key] = row
        self.rank_need = (g, [need[key] for key in rank_keys])
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
            return float("inf")
        lo_i, hi_i = 0, len(values) - 1  # the least value that is enough
        while lo_i < hi_i:
            mid = (lo_i + hi_i) // 2
            if enough(values[mid]):
                hi_i = mid
            else:
                lo_i = mid + 1
        lo = values[lo_i]
        per_mb = lo * (1 - 1e-9)
        params = sum(min(c.num_params for c in r) * seg.size for r, seg in zip(self.choices, self.segments))
        tail_s = sum(rank_tail_s(s, self.cluster, params / s.pp))
        self._refined = max(base, (s.microbatches + self.bubble) * per_mb + tail_s)
        return self._refined

    def memory_lower_bound_bytes(self) -> float:
        """No layout of this strategy needs less memory on its fullest device (leanest choices, perfectly
        balanced parameters and activations, the smallest in-flight count)."""
        params = sum(min(c.num_params for c in rows) * seg.size for rows, seg in zip(self.choices, self.segments))
        act = sum(min(c.activation_bytes for c in rows) * seg.size for rows, seg in zip(self.choices, self.segments))
        copies = sum(min(c.copy_bytes for c in rows) * seg.size for rows, seg in zip(self.choices, self.segments))
        state = rank_state_bytes(self.strategy, int(params // self.strategy.pp))
        flight = min(in_flight(self.strategy, r) for r in (0, self.strategy.pp - 1))
        return state + (flight * act + copies) / self.strategy.pp

    # -- evaluation -----------------------------------------------------------------------------------------
    def evaluate(self, assignment: Assignment) -> PlanCost:
        """The exact cost (:func:`autoplan.cost.plan_cost.compose`) of an assignment."""
        stages = [[self._cost(i, choice) for i, choice in stage] for stage in assignment]
        return compose(self.strategy, self.cluster, stages, self.global_batch_size)

    def _cost(self, i: int, choice: LayerChoice) -> cost.LayerCost:
        for c in self.choices[self.segment_of[i]]:
            if c.choice == choice:
                return c.layer_cost
        seg = self.segments[self.segment_of[i]]  # a dominated choice: cost it directly
        return self.cache.get(self.graph.layers[i], seg.signature, self.strategy, choice)

    def without_needless_recompute(self, assignment: Assignment, result: PlanCost) -> tuple[Assignment, PlanCost]:
        """Drop recompute, layer by layer in model order, wherever that keeps the step time and still fits:
        recompute that buys nothing (off the slowest rank, or of a layer the cost model finds free) only
        costs real kernels."""
        best = [list(stage) for stage in assignment]
        for k, stage in enumerate(best):
            for j, (i, choice) in enumerate(stage):
                if choice.recompute is None:
                    continue
                stage[j] = (i, LayerChoice(choice.tp_on, None))
                trial = self.evaluate(best)
                if trial.fits and trial.step_time_s <= result.step_time_s:
                    result = trial
                else:
                    stage[j] = (i, choice)
        return best, result

    # -- greedy ---------------------------------------------------------------------------------------------
    def greedy(self) -> tuple[Assignment, PlanCost] | None:
        """The best feasible layout among a few simple ones, or None.

        For each "level" ℓ, every layer takes its ℓ-th fastest non-dominated choice (ℓ = 0: fastest, the last:
        leanest); stages are then cut by binary search on the per-stage time limit, filling each stage while
        its device memory still fits (one stage per rank) or by balancing time (interleaved).
        """
        best: tuple[Assignment, PlanCost] | None = None
        levels = max(len(c) for c in self.choices)
        for level in range(levels):
            picks = [self.choices[g][min(level, len(self.choices[g]) - 1)] for g in self.segment_of]
            picks = self._untie(picks)
            for assignment in self._partitions(picks):
                result = self.evaluate(assignment)
                if result.fits and (best is None or result.step_time_s < best[1].step_time_s):
                    best = (assignment, result)
        return best

    def leanest(self) -> tuple[Assignment, PlanCost]:
        """A layout built for least memory (leanest choices, stages cut to balance memory); for error messages."""
        picks = self._untie([min(self.choices[g], key=lambda c: (c.activation_bytes + c.num_params, c.time_s))
                             for g in self.segment_of])
        results = [(a, self.evaluate(a)) for a in self._partitions(picks, memory_first=True)]
        return min(results, key=lambda ar: (max(ar[1].peak_memory_bytes), ar[1].step_time_s))

    def _untie(self, picks: list[ChoiceCost]) -> list[ChoiceCost]:
        """Make the layers of each tied group agree: all sharded or none, whichever is faster in total."""
        for segs in self.tied_segments:
            layers = [i for i, g in enumerate(self.segment_of) if g in segs]
            if len({picks[i].choice.tp_on for i in layers}) > 1:
                options = []
                for tp_on in (True, False):
                    row = {i: next(c for c in self.choices[self.segment_of[i]]
                                   if c.choice == LayerChoice(tp_on, picks[i].choice.recompute)) for i in layers}
                    options.append((sum(c.time_s for c in row.values()), not tp_on, row))
                for i, c in min(options, key=lambda o: o[:2])[2].items():
                    picks[i] = c
        return picks

    def _partitions(self, picks: list[ChoiceCost], memory_first: bool = False) -> list[Assignment]:
        stages = self.strategy.num_stages
        times = [p.time_s + self.p2p_s[i] for i, p in enumerate(picks)]
        state_per_param = rank_state_bytes(self.strategy, 10**9) / 10**9
        mem = [[p.fixed_bytes(state_per_param) + self.in_flight[k % self.strategy.pp] * p.activation_bytes
                for p in picks] for k in range(stages)]
        out = [self._balanced(picks, mem[0] if memory_first else times)]
        if self.strategy.virtual_stages == 1 and stages > 1:
            cap = float("inf") if memory_first else self.capacity_bytes
            cut = self._threshold_cuts(times, mem, picks, mem if memory_first else None, cap)
            if cut is not None:
                out.append(cut)
        return out

    def _balanced(self, picks: list[ChoiceCost], weights: list[float]) -> Assignment:
        """Cut where the running sum of ``weights`` crosses multiples of total / stages."""
        n, stages = self.num_layers, self.strategy.num_stages
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
        return self._assign(cuts, picks)

    def _threshold_cuts(self, times: list[float], mem: list[list[float]], picks: list[ChoiceCost],
                        weights: list[list[float]] | None, cap: float) -> Assignment | None:
        """Binary search on a per-stage limit of time (or memory when ``weights``) under the memory cap."""
        n, stages = self.num_layers, self.strategy.num_stages
        margin = 2 * max(self.boundary_bytes) + max(p.transient_bytes for p in picks)

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
        return self._assign(best, picks)

    def _assign(self, cuts: list[int], picks: list[ChoiceCost]) -> Assignment:
        return [[(i, picks[i].choice) for i in range(a, b)] for a, b in zip(cuts, cuts[1:])]


def tied_layer_groups(graph: ModelGraph) -> list[list[int]]:
    """Indices of the layers that own each group of tied parameters (``graph.tied_parameters``).

    Example:
        >>> import sys; sys.path.insert(0, "tests")
        >>> from graphs import gpt_like_graph
        >>> g = gpt_like_graph(layers=1)
        >>> g.tied_parameters = [("tok.weight", "head.weight")]
        >>> tied_layer_groups(g)
        [[0, 4]]
    """
    names = [layer.name for layer in graph.layers]

    def owner(fqn: str) -> int | None:
        best = None
        for i, name in enumerate(names):
            if fqn == name or fqn.startswith(name + ".") or name == "":
                if best is None or len(name) > len(names[best]):
                    best = i
        return best

    groups = []
    for tied in graph.tied_parameters:
        owners = sorted({o for o in (owner(fqn) for fqn in tied) if o is not None})
        if len(owners) > 1:
            groups.append(owners)
    return groups


def _sorted(rows: list[ChoiceCost]) -> list[ChoiceCost]:
    return sorted(rows, key=lambda c: (c.time_s, c.num_params, c.activation_bytes, c.transient_bytes,
                                       c.copy_bytes) + c.choice.order_key)


def _non_dominated(rows: list[ChoiceCost]) -> list[ChoiceCost]:
    """Rows no other row beats or ties in every term, sorted fastest first (ties: first listed wins)."""
    def key(c: ChoiceCost) -> tuple:
        return (c.time_s, c.num_params, c.activation_bytes, c.transient_bytes, c.copy_bytes)

    kept: list[ChoiceCost] = []
    for i, row in enumerate(rows):
        dominated = False
        for j, other in enumerate(rows):
            if j == i:
                continue
            ko, kr = key(other), key(row)
            if all(a <= b for a, b in zip(ko, kr)) and (ko != kr or j < i):
                dominated = True
                break
        if not dominated:
            kept.append(row)
    return sorted(kept, key=lambda c: key(c) + c.choice.order_key)


class _LowerHull:
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

    def __call__(self, x: float) -> float:
        hull = self.hull
        if x < hull[0][0]:
            return float("inf")
        for (m1, t1), (m2, t2) in zip(hull, hull[1:]):
            if x < m2:
                return t1 + (t2 - t1) * (x - m1) / (m2 - m1)
        return hull[-1][1]
