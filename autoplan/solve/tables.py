"""Per-strategy cost tables: every allowed choice of every layer, costed once, for the bounds, the greedy
layouts and the CP-SAT model of one strategy.

Identical neighbouring layers (same structure and figures, e.g. the transformer blocks) form one *segment*:
they have identical costs, so the solver only decides how many of a segment's layers each stage takes and
how many of those use each choice. Choices dominated in every cost term (slower, more parameters, more
activations, more transient memory, a larger weight copy) are dropped: keeping the dominating one never costs
anything.

Example:
    >>> from autoplan.synthetic import gpt_like_graph
    >>> [(seg.start, seg.stop) for seg in segments_of(gpt_like_graph(layers=4).layers)]  # tok pos blocks ln_f head
    [(0, 1), (1, 2), (2, 6), (6, 7), (7, 8)]
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace
from typing import Sequence

from .. import cost
from ..cluster import Cluster
from ..cost.plan_cost import (PlanCost, Strategy, compose, fsdp_gather_bytes, in_flight, layer_choice_cost,
                              layer_cost_context, loss_bytes, owns_tied_weight, rank_state_bytes_per_param,
                              rank_tail_terms, stage_p2p_s, weight_copy_bytes)
from ..cost.sequence import sequence_edge_payers
from ..graph import Layer, ModelGraph
from ..options import PlanOptions
from ..mixed_precision import low_precision_run
from .space import LayerChoice, enumerate_strategies, global_batch_size, layer_choices
from .tied import TiedTerm, tied_costs, tied_layer_groups, tied_modules, tied_sync_terms

__all__ = ["Segment", "segments_of", "LayerCostCache", "ChoiceCost", "StrategyTables", "Assignment",
           "build_tables", "LazyTables", "example_tables", "tied_layer_groups"]

#: Per stage, the (layer index, choice) pairs it runs, in model order.
Assignment = list[list[tuple[int, LayerChoice]]]


def _signature(layer: Layer) -> tuple:
    return (layer.kind, layer.forward_flops, layer.backward_flops, layer.num_params, layer.param_bytes,
            layer.activation_bytes, layer.output_bytes, layer.autocast, layer.bf16_weights,
            layer.tp_groups and tuple(
                (g.divisor, g.num_params, g.forward_flops, g.activation_bytes, g.output_bytes, g.input_bytes,
                 g.autocast, g.bf16_weights, tuple(sorted(g.styles.values())))
                for g in layer.tp_groups),
            tuple((o.module == layer.name, o.saved_activation_bytes, o.forward_flops,
                   tuple(o.reaches(g.styles) for g in layer.tp_groups)) for o in layer.recompute_options))


@dataclass(frozen=True)
class Segment:
    """Layers ``start..stop-1`` of the chain, all with the same signature."""

    start: int
    stop: int
    signature: tuple

    @property
    def size(self) -> int:
        return self.stop - self.start


def segments_of(layers: Sequence[Layer], sequence_parallel: bool = False) -> list[Segment]:
    """Maximal runs of neighbouring layers with equal signatures (for a strategy with ``sequence_parallel``, the
    layer that pays a run's entry and exit, :func:`autoplan.cost.sequence.sequence_edge_payers`, is a segment of
    its own: the last block costs more than the others)."""
    out: list[Segment] = []
    payers = sequence_edge_payers(list(layers), 0) if sequence_parallel else {}
    for i, layer in enumerate(layers):
        sig = _signature(layer) + (layer.sequence_parallel, i in payers)
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
        # the same few answers are asked for by every one of ~1,000 strategies: each is worked out once
        self._choices: dict[tuple, list[LayerChoice]] = {}
        self._payers: dict[int, set[int]] = {}
        self._signature_ids: dict[tuple, int] = {}
        self._contexts: dict[tuple, tuple[float, bool, float]] = {}
        self._contention: dict[tuple, float] = {}
        self._largest_params = max((l.num_params for l in graph.layers), default=0)
        self.tied_groups = tied_layer_groups(graph)
        self.tied_modules = tied_modules(graph)

    def choices(self, layer: Layer, tp: int, recompute: str, sequence_parallel: bool,
                fsdp: bool = False) -> list[LayerChoice]:
        """:func:`autoplan.solve.space.layer_choices`, memoised by layer and arguments."""
        key = (layer.index, tp, recompute, sequence_parallel, fsdp)
        hit = self._choices.get(key)
        if hit is None:
            hit = self._choices[key] = layer_choices(layer, tp, recompute, sequence_parallel, fsdp)
        return hit

    def contention(self, strategy: Strategy) -> float:
        """:func:`autoplan.cost.compute_contention` of the strategy, memoised by what it reads."""
        shape = (strategy.pp, strategy.microbatches, strategy.schedule, strategy.virtual_stages)
        hit = self._contention.get(shape)
        if hit is None:
            hit = self._contention[shape] = strategy.contention(self.cluster)
        return hit

    def get(self, layer: Layer, signature: tuple, strategy: Strategy, choice: LayerChoice,
            relaxed: bool = False) -> cost.LayerCost:
        """The cost of ``choice`` for ``layer``; ``relaxed``: a lower bound on it (no FSDP unit overhead, no
        per-step seconds: both only add non-negative seconds), shared by every data-parallel kind and size."""
        if strategy.sequence_parallel and strategy.tp not in self._payers:
            self._payers[strategy.tp] = set(sequence_edge_payers(self.graph.layers, strategy.tp))
        sp = strategy.sequence_parallel and (strategy.tp, strategy.microbatches,
                                             layer.index in self._payers[strategy.tp])
        # a small int stands for the (long, nested) signature: hashing it on every call would cost more
        sig_id = self._signature_ids.setdefault(signature, len(self._signature_ids))
        # what the cost reads from the rest of the strategy (contention, FSDP unit, per-step seconds): few
        # distinct values, but a strategy that differs there must not share a cost. The schedule is read only
        # through the compute contention, so its value (few: 1.0 on dedicated devices) stands for it in the key.
        contention = self.contention(strategy)
        context_key = (strategy.pp, strategy.dp, strategy.tp, strategy.microbatches, contention,
                       strategy.data_parallel, strategy.fsdp_reshard, strategy.precision, choice.tp_on,
                       len(layer.param_names), layer.num_params == 0, layer.num_params * 8 >= self._largest_params,
                       owns_tied_weight(self.graph, layer))  # left with the FSDP root
        if relaxed:
            context = (contention, 0, 0.0)
        else:
            context = self._contexts.get(context_key)
            if context is None:
                context = self._contexts[context_key] = layer_cost_context(
                    self.graph, layer, self.cluster, strategy, choice.tp_on, self._largest_params)
        # an FSDP unit's hooks cost what the way it runs them costs: keeping its weights, or resharding
        keeps = context[1] > 0 and strategy.fsdp_keeps_weights
        # autocast and bf16 weights keep different tensors wide (autoplan.cost.layer_choice.as_low_precision_runs)
        key = (sig_id, strategy.tp if choice.tp_on else 1, strategy.microbatch_size, strategy.precision,
               low_precision_run(strategy.mixed_precision), choice.recompute, sp, context, keeps)
        hit = self._memo.get(key)
        if hit is None:
            hit = layer_choice_cost(self.graph, layer, self.cluster, strategy, choice.tp_on, choice.option(layer),
                                    context)
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
    copy_bytes: int = 0  # the low-precision copy of the layer's weights kept for backward (once per rank, not per
    # microbatch: it sits beside the model states)

    def fixed_bytes(self, sigma: float) -> float:
        """Bytes the layer adds to its rank whatever the in-flight count: model states and the weight copy."""
        return sigma * self.num_params + self.copy_bytes


class StrategyTables:
    """Everything the search needs about one strategy, computed once."""

    def __init__(self, graph: ModelGraph, cluster: Cluster, strategy: Strategy, segments: list[Segment],
                 cache: LayerCostCache, recompute: str, global_batch_size: int, tp_pinned: bool = False,
                 relaxed: bool = False):
        """Cost every allowed choice of every segment under ``strategy`` (memoised across strategies). With
        ``tp_pinned`` (the user pinned mesh["tp"] > 1) every layer that can shard does: a pinned degree is a
        request to shard, not to replicate the work over the tp ranks. ``relaxed``: every row's seconds are a
        lower bound (:meth:`LayerCostCache.get`), for :func:`autoplan.solve.bounds.lower_bound_s` only."""
        self.graph, self.cluster, self.strategy, self.segments = graph, cluster, strategy, segments
        self.cache, self.global_batch_size = cache, global_batch_size
        self.capacity_bytes = cluster.device.usable_memory_bytes
        self.num_layers = len(graph.layers)
        self.segment_of = [g for g, seg in enumerate(segments) for _ in range(seg.size)]
        # Layers sharing a tied weight must agree on tensor parallelism (one tensor, one placement): a tied
        # segment keeps all its choices (no dominance pruning) so that either decision stays available, and a
        # group that cannot shard everywhere is not sharded anywhere.
        self.tied_segments: list[list[int]] = []
        no_tp: set[int] = set()
        fsdp = strategy.data_parallel == "fsdp" and strategy.dp > 1
        for group in cache.tied_groups:
            segs = sorted({self.segment_of[i] for i in group})
            shardable = [any(c.tp_on for c in cache.choices(graph.layers[i], strategy.tp, recompute,
                                                            strategy.sequence_parallel, fsdp)) for i in group]
            if not all(shardable) or any(segments[g].size > 1 for g in segs):
                no_tp.update(segs)
            elif len(segs) > 1:
                self.tied_segments.append(segs)
        tied = {g for segs in self.tied_segments for g in segs}
        self.choices: list[list[ChoiceCost]] = []
        for g, seg in enumerate(segments):
            layer = graph.layers[seg.start]
            rows = []
            allowed = [c for c in cache.choices(layer, strategy.tp, recompute, strategy.sequence_parallel, fsdp)
                       if not (c.tp_on and g in no_tp)]
            if tp_pinned and any(c.tp_on for c in allowed):
                allowed = [c for c in allowed if c.tp_on]
            for choice in allowed:
                lc = cache.get(layer, seg.signature, strategy, choice, relaxed)
                rows.append(ChoiceCost(choice, lc, lc.total_s, lc.num_params, lc.activation_bytes,
                                       lc.transient_bytes + fsdp_gather_bytes(strategy, lc.num_params),
                                       weight_copy_bytes(strategy, lc)))
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
        """Send time of a cut after layer i, for one microbatch (forward activation + backward gradient), and a
        sequence-parallel run's gather and split there (``LayerCost.cut_s``: the same for every choice)."""
        per_segment = [stage_p2p_s(self.strategy, self.cluster, rows[0].layer_cost.boundary_bytes)
                       + rows[0].layer_cost.cut_s for rows in self.choices]
        return [per_segment[g] for g in self.segment_of]

    @cached_property
    def in_flight(self) -> list[float]:
        """Per pipeline rank, the microbatches whose activations it holds at its peak."""
        return [in_flight(self.strategy, r) for r in range(self.strategy.pp)]

    @cached_property
    def tail_terms(self) -> tuple[float, float]:
        """(α seconds, β seconds per parameter): a rank's DP sync + optimizer step is α + β·P."""
        return rank_tail_terms(self.strategy, self.cluster)

    @cached_property
    def state_bytes_per_param(self) -> float:
        """σ: model-state bytes per parameter of a rank, on one device."""
        return rank_state_bytes_per_param(self.strategy)

    # -- tied weights (autoplan.solve.tied) ---------------------------------------------------------------
    def tied_costs(self, assignment: Assignment) -> tuple[tuple[float, ...], tuple[int, ...]]:
        """Per pipeline rank, the all-reduce of weights tied across pipeline ranks under ``assignment`` and the
        elements of their copies it holds (:func:`autoplan.solve.tied.tied_costs`)."""
        return tied_costs(self, assignment)

    @cached_property
    def tied_sync_terms(self) -> list[TiedTerm]:
        """The tied weights as the CP-SAT model prices them (:func:`autoplan.solve.tied.tied_sync_terms`)."""
        return tied_sync_terms(self)

    # -- evaluation -----------------------------------------------------------------------------------------
    def evaluate(self, assignment: Assignment) -> PlanCost:
        """The exact cost (:func:`autoplan.cost.plan_cost.compose`) of an assignment, the tied weights' sync and
        copies included (as :func:`autoplan.cost.plan_cost.estimate` prices the plan)."""
        stages = [[self._cost(i, choice) for i, choice in stage] for stage in assignment]
        return compose(self.strategy, self.cluster, stages, self.global_batch_size, *self.tied_costs(assignment))

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


def build_tables(graph: ModelGraph, cluster: Cluster, options: PlanOptions) -> list[StrategyTables]:
    """The tables of every strategy the options allow (:func:`autoplan.solve.space.enumerate_strategies`), in the
    search's order, sharing one layer-cost cache.

    Example:
        >>> from autoplan import Cluster
        >>> from autoplan.synthetic import gpt_like_graph
        >>> tables = build_tables(gpt_like_graph(layers=4), Cluster.preset("a100-80gb"),
        ...                       PlanOptions(global_batch_size=8, mesh={"pp": 2, "tp": 1}, microbatch_size=1))
        >>> [t.strategy.describe() for t in tables][:2]
        ['pp2×dp4×tp1 1f1b mb=1×2 ddp', 'pp2×dp4×tp1 1f1b mb=1×2 fsdp']
    """
    segments = {sp: segments_of(graph.layers, sp) for sp in (False, True)}
    cache = LayerCostCache(graph, cluster)
    batch = global_batch_size(graph, options)
    return [StrategyTables(graph, cluster, strategy, segments[strategy.sequence_parallel], cache, options.recompute,
                           batch, tp_pinned="tp" in options.mesh)
            for strategy in enumerate_strategies(graph, cluster, options)]


class LazyTables:
    """The tables of every strategy the options allow, in :func:`build_tables`' order, each built when first
    read; :meth:`relaxed` gives a strategy's cheaper tables whose seconds bound the real ones from below (what
    lets the search skip the tables of strategies that cannot win).

    Example:
        >>> from autoplan import Cluster
        >>> from autoplan.synthetic import gpt_like_graph
        >>> from autoplan.solve.bounds import lower_bound_s
        >>> lazy = LazyTables(gpt_like_graph(layers=4), Cluster.preset("a100-80gb"),
        ...                   PlanOptions(global_batch_size=8, mesh={"pp": 2, "tp": 1}, microbatch_size=1))
        >>> len(lazy), lazy.built(1), lower_bound_s(lazy.relaxed(1)) <= lower_bound_s(lazy[1]), lazy.built(1)
        (10, False, True, True)
    """

    def __init__(self, graph: ModelGraph, cluster: Cluster, options: PlanOptions):
        self._segments = {sp: segments_of(graph.layers, sp) for sp in (False, True)}
        self._cache = LayerCostCache(graph, cluster)
        self._args = (graph, cluster, options.recompute, global_batch_size(graph, options), "tp" in options.mesh)
        self.strategies = enumerate_strategies(graph, cluster, options)
        self._built: dict[int, StrategyTables] = {}
        self._relaxed: dict[tuple, list[list[ChoiceCost]]] = {}
        # Strategies sharing a relaxed key share its rows, priced for the one of most microbatches: the only
        # term a relaxed row reads from the microbatch count (a sequence-parallel layer's norm-gradient
        # all-reduce, spread over the microbatches) only shrinks as the count grows, so those rows bound every
        # strategy of the key from below, and one key per (tp, microbatch size, …) leaves 2.5× fewer to price.
        self._relaxed_key = [self._key_of(s) for s in self.strategies]
        self._relaxed_by: dict[tuple, int] = {}
        for i, key in enumerate(self._relaxed_key):
            j = self._relaxed_by.setdefault(key, i)
            if self.strategies[i].microbatches > self.strategies[j].microbatches:
                self._relaxed_by[key] = i

    def _key_of(self, s: Strategy) -> tuple:
        return (s.tp, s.microbatch_size, s.precision, s.sequence_parallel, self._cache.contention(s),
                s.data_parallel == "fsdp" and s.dp > 1)

    def _make(self, i: int, relaxed: bool) -> StrategyTables:
        graph, cluster, recompute, batch, tp_pinned = self._args
        strategy = self.strategies[i]
        return StrategyTables(graph, cluster, strategy, self._segments[strategy.sequence_parallel], self._cache,
                              recompute, batch, tp_pinned=tp_pinned, relaxed=relaxed)

    def relaxed(self, i: int) -> "StrategyTables | SimpleNamespace":
        """What :func:`autoplan.solve.bounds.lower_bound_s` reads of strategy ``i``'s tables, with lower-bound
        seconds. Relaxed rows read neither the data-parallel size nor the schedule (but for the contention and
        whether FSDP shards, which limits tensor parallelism), nor the microbatch count (priced at the most
        microbatches of the strategies that share them, the least seconds): strategies that differ only there
        share them."""
        s = self.strategies[i]
        key = self._relaxed_key[i]
        rows = self._relaxed.get(key)
        if rows is None:
            rows = self._relaxed[key] = self._make(self._relaxed_by[key], relaxed=True).choices
        return SimpleNamespace(strategy=s, choices=rows, segments=self._segments[s.sequence_parallel],
                               bubble=s.bubble_stage_times / s.virtual_stages,
                               tail_terms=rank_tail_terms(s, self._args[1]))

    def built(self, i: int) -> bool:
        """Whether strategy ``i``'s tables have been built."""
        return i in self._built

    def __len__(self) -> int:
        return len(self.strategies)

    def __getitem__(self, i: int) -> StrategyTables:
        hit = self._built.get(i)
        if hit is None:
            hit = self._built[i] = self._make(i, relaxed=False)
        return hit

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def example_tables(**options) -> StrategyTables:
    """The first strategy's tables for a 4-block GPT-like graph (hidden 256, sequence 128, vocabulary 1000,
    :func:`autoplan.synthetic.gpt_like_graph`) on one A100 node, under ``PlanOptions(global_batch_size=8,
    **options)``: a small, fixed case for examples.

    Example:
        >>> t = example_tables(mesh={"pp": 2, "tp": 1}, microbatch_size=1)
        >>> t.strategy.describe(), t.num_layers, [seg.size for seg in t.segments]
        ('pp2×dp4×tp1 1f1b mb=1×2 ddp', 8, [1, 1, 4, 1, 1])
    """
    from ..synthetic import gpt_like_graph

    graph = gpt_like_graph(layers=4, hidden=256, seq=128, vocab=1000)
    return build_tables(graph, Cluster.preset("a100-80gb"), PlanOptions(global_batch_size=8, **options))[0]


def _sorted(rows: list[ChoiceCost]) -> list[ChoiceCost]:
    return sorted(rows, key=lambda c: (c.time_s, c.num_params, c.activation_bytes, c.transient_bytes,
                                       c.copy_bytes) + c.choice.order_key)


def _non_dominated(rows: list[ChoiceCost]) -> list[ChoiceCost]:
    """Rows no other row beats or ties in every term, sorted fastest first (ties: first listed wins)."""
    def key(c: ChoiceCost) -> tuple:
        return (c.time_s, c.num_params, c.activation_bytes, c.transient_bytes, c.copy_bytes)

    keys = [key(row) for row in rows]  # once per row, not once per pair
    kept: list[ChoiceCost] = []
    for i, row in enumerate(rows):
        kr = keys[i]
        dominated = False
        for j, ko in enumerate(keys):
            if j == i:
                continue
            if all(a <= b for a, b in zip(ko, kr)) and (ko != kr or j < i):
                dominated = True
                break
        if not dominated:
            kept.append(row)
    return sorted(kept, key=lambda c: key(c) + c.choice.order_key)
