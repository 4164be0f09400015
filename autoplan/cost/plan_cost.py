"""The cost of a whole plan: step time and per-device memory, composed from :mod:`autoplan.cost`.

This is THE cost the planner minimises; :mod:`autoplan.solve` builds its CP-SAT objective from the same
pieces, and every plan it returns carries ``estimate(graph, plan)`` as ``plan.predicted``.

Ranks are laid out pp-major, then dp, then tp innermost: a tensor-parallel group is ``tp`` consecutive ranks
(stride 1), a data-parallel group ``dp`` ranks ``tp`` apart, and neighbouring pipeline ranks are ``dp·tp``
apart. Pipeline stage ``k`` runs on pipeline rank ``k mod pp``.

For one microbatch, stage ``k`` takes

    T_k = Σ_{layers i in k} (forward + backward + recompute + tensor-parallel comm)_i + 2·p2p(boundary_k)

where the p2p term (activation sent forward, its gradient sent back) is paid by every stage but the last. A
pipeline rank's time per microbatch is the sum over its stages, ``T_r = Σ_{k ≡ r} T_k``, and one step is

    step_time_s = microbatches · max_r T_r  +  b · max_k T_k  +  max_r (dp_sync_r + optimizer_r)

with ``b = pp − 1`` stage-times of pipeline bubble (fill and drain: Huang et al. 2019 for GPipe, Narayanan et
al. SC'21 §2.2.1 for 1F1B). With v virtual stages per rank (interleaved, SC'21 §2.2.2) a stage is 1/v of a
rank, which gives the paper's (pp − 1)/v rank-times when the stages are balanced and charges an unbalanced
interleaving for its largest stage. What overlaps: nothing across these terms. Tensor-parallel collectives
and pipeline sends sit on the critical path of each microbatch (Megatron-LM runs them synchronously); the
data-parallel gradient synchronisation and the optimizer step follow the last backward and are counted in
full, which is conservative for DDP's bucketed all-reduce (it partly hides behind the last backward).

Memory of pipeline rank ``r`` (its worst device; all dp × tp devices of a rank hold the same):

    model_state_bytes(P_r) + in_flight_r · A_r + max_i transient_i + p2p buffers + W_r + [r = last] · loss

``P_r`` are the rank's parameters after tensor parallelism, ``A_r`` the bytes all its layers keep for one
microbatch's backward, ``in_flight_r`` in those units (interleaved chunks count 1/v each, see
:func:`autoplan.cost.in_flight_microbatches`),
``transient_i`` what only exists while layer ``i`` runs backward (rematerialised activations, and under FSDP
the layer's gathered weights and unsharded gradients), and the p2p buffers one microbatch's received input
and sent output per stage. ``W_r`` is the low-precision copy of the rank's matmul weights that autocast keeps
for backward (mixed precision without FSDP sharding: :func:`autoplan.cost.autocast_weight_copy_bytes`, one
copy, not one per microbatch, because autocast caches the cast), or under ``replicate`` of all its parameters
(:func:`weight_copy_bytes`). The last rank, ``(S − 1) mod pp``, runs the
loss: the executor applies ``loss_fn`` to the model output, the final layer's output, and a cross-entropy
over it holds fp32 buffers for one microbatch of logits at the end of forward / start of backward
(:func:`autoplan.cost.cross_entropy_bytes`; the vocabulary-parallel head gathers the logits, so they are not
divided by tp). It is counted for every model, whatever its output: a constant of that rank.

``peak_memory_bytes`` has one entry per stage (``plan.stages``): stage ``k``'s entry is the peak of the
devices that run it, pipeline rank ``k mod pp``, so with v virtual stages each rank's figure appears v times.

Example (two Linear layers, one per pipeline stage, over 2 × 4 A100s):
    >>> from autoplan import Cluster
    >>> from autoplan.synthetic import mlp_graph
    >>> graph, cluster = mlp_graph(widths=(256, 1024, 256), batch=32), Cluster.preset("a100-80gb")
    >>> s = Strategy(pp=2, dp=4, tp=1, microbatch_size=4, microbatches=2, schedule="1f1b", data_parallel="ddp")
    >>> result = compose(s, cluster, [[layer_choice_cost(graph, layer, cluster, s, False, None)]
    ...                               for layer in graph.layers], global_batch_size=32)
    >>> len(result.peak_memory_bytes), result.fits
    (2, True)
    >>> parts = result.compute_s + result.comm_s + result.bubble_s + result.recompute_s + result.optimizer_s
    >>> abs(parts - result.step_time_s) < 1e-12          # the split adds up to the step time
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .. import cost
from ..vocabulary import PRECISION_BYTES
from ..cluster import Cluster
from ..graph import ModelGraph
from ..plan import Plan, Predicted, RankFigures, StageTime
# A strategy and its per-rank terms live in .strategy, a layer's cost under it in .layer_choice; they are
# re-exported here, where compose and estimate use them.
from .layer_choice import layer_choice_cost, layer_cost_context, owns_tied_weight, plan_layer_choices
from .tied import tied_copy_params, tied_gradient_sync_s
from .strategy import (Strategy, fsdp_gather_bytes, in_flight, loss_bytes, p2p_link, rank_state_bytes,
                       rank_state_bytes_per_param, rank_tail_s, rank_tail_terms, stage_p2p_s,
                       weight_copy_bytes, weight_copy_bytes_per_param)

__all__ = ["Strategy", "RankCost", "PlanCost", "estimate", "estimate_breakdown", "compose", "layer_choice_cost",
           "owns_tied_weight", "plan_layer_choices",
           "layer_cost_context", "rank_tail_s", "rank_tail_terms", "rank_state_bytes", "rank_state_bytes_per_param",
           "weight_copy_bytes_per_param", "weight_copy_bytes", "loss_bytes", "fsdp_gather_bytes", "p2p_link", "stage_p2p_s", "in_flight"]


@dataclass(frozen=True)
class RankCost:
    """One pipeline rank: per-microbatch time parts, per-step tail, and memory parts (bytes)."""

    rank: int
    stages: tuple[int, ...]
    layers: int
    compute_s: float  # forward + backward, one microbatch
    recompute_s: float
    tp_comm_s: float
    p2p_s: float
    num_params: int  # after tensor parallelism
    dp_sync_s: float
    optimizer_s: float
    model_state_bytes: int
    in_flight: float  # microbatches whose activations are held at the peak
    activation_bytes: int  # in flight, all of them
    transient_bytes: int
    p2p_buffer_bytes: int
    weight_copy_bytes: int = 0  # the low-precision weight copy kept for backward (weight_copy_bytes)
    loss_bytes: int = 0  # the loss's buffers for one microbatch (the last rank only)

    @property
    def microbatch_s(self) -> float:
        return self.compute_s + self.recompute_s + self.tp_comm_s + self.p2p_s

    @property
    def tail_s(self) -> float:
        return self.dp_sync_s + self.optimizer_s

    @property
    def peak_bytes(self) -> int:
        return (self.model_state_bytes + self.activation_bytes + self.transient_bytes + self.p2p_buffer_bytes
                + self.weight_copy_bytes + self.loss_bytes)


@dataclass(frozen=True)
class PlanCost:
    """Everything :func:`estimate` computed, for explanations; ``predicted`` is the summary."""

    strategy: Strategy
    ranks: tuple[RankCost, ...]
    capacity_bytes: int
    step_time_s: float
    compute_s: float
    recompute_s: float
    comm_s: float
    bubble_s: float
    optimizer_s: float
    samples_per_s: float
    global_batch_size: int
    notes: tuple[str, ...] = field(default_factory=tuple)
    stage_times: tuple[StageTime, ...] = ()  # per stage, one microbatch: the T_k above, by kind

    @property
    def slowest_rank(self) -> RankCost:
        return max(self.ranks, key=lambda r: (r.microbatch_s, -r.rank))

    @property
    def rank_peak_memory_bytes(self) -> tuple[int, ...]:
        """Peak bytes of one device of each pipeline rank."""
        return tuple(r.peak_bytes for r in self.ranks)

    @property
    def peak_memory_bytes(self) -> tuple[int, ...]:
        """One entry per stage: the peak of the device group that runs stage k (pipeline rank k mod pp)."""
        pp = len(self.ranks)
        return tuple(self.ranks[k % pp].peak_bytes for k in range(self.strategy.num_stages))

    @property
    def fits(self) -> bool:
        return max(self.peak_memory_bytes) <= self.capacity_bytes

    @property
    def predicted(self) -> Predicted:
        return Predicted(
            step_time_s=self.step_time_s, peak_memory_bytes=self.peak_memory_bytes, compute_s=self.compute_s,
            comm_s=self.comm_s, bubble_s=self.bubble_s, recompute_s=self.recompute_s,
            optimizer_s=self.optimizer_s, samples_per_s=self.samples_per_s, stages=self.stage_times,
            ranks=tuple(rank_figures(self.strategy, r) for r in self.ranks),
        )


def rank_figures(strategy: Strategy, rank: RankCost) -> RankFigures:
    """A rank's tail seconds and its peak bytes by kind, adding up to ``rank.peak_bytes``. The model state splits
    as ZeRO counts it (FSDP holds ⌈Ψ/dp⌉ of each kind, DDP all Ψ); model-state bytes beyond that (weights and
    gradient accumulators FSDP keeps unsharded through a step) count as parameters at the compute precision,
    the rest as gradients; everything else in the peak (transient, p2p, autocast-copy, loss bytes) as transients.
    """
    per_param = cost.state_bytes_per_param(strategy.precision, strategy.optimizer)
    held = -(-rank.num_params // strategy.dp) if strategy.data_parallel == "fsdp" else rank.num_params
    extra = max(0, rank.model_state_bytes - held * per_param.total)
    extra_weights = min(extra, rank.num_params * PRECISION_BYTES[strategy.precision])
    params, grads = held * per_param.params + extra_weights, held * per_param.grads + extra - extra_weights
    optimizer = held * per_param.optimizer
    return RankFigures(
        dp_sync_s=rank.dp_sync_s, optimizer_s=rank.optimizer_s, parameters_bytes=params, gradients_bytes=grads,
        optimizer_states_bytes=optimizer, activations_bytes=rank.activation_bytes,
        transients_bytes=rank.peak_bytes - params - grads - optimizer - rank.activation_bytes,
    )


def compose(strategy: Strategy, cluster: Cluster, stages: Sequence[Sequence[cost.LayerCost]],
            global_batch_size: int, tied_sync_s: Sequence[float] = (),
            tied_copy_params: Sequence[int] = ()) -> PlanCost:
    """The step time and memory of ``stages`` (per stage, the costs of its layers in order); ``tied_sync_s``:
    per pipeline rank, the per-step all-reduce of weights tied across ranks, and ``tied_copy_params`` the copies
    of them a rank holds beside its layers' parameters (:mod:`autoplan.cost.tied`).

    Example (one device, one microbatch: the step is the layers' time plus the optimizer update):
        >>> from autoplan import Cluster
        >>> from autoplan.synthetic import mlp_graph
        >>> graph, cluster = mlp_graph(widths=(256, 1024, 256), batch=32), Cluster.preset("a100-80gb")
        >>> s = Strategy(1, 1, 1, 32, 1, "1f1b", "ddp")
        >>> layers = [layer_choice_cost(graph, layer, cluster, s, False, None) for layer in graph.layers]
        >>> result = compose(s, cluster, [layers], global_batch_size=32)
        >>> abs(result.step_time_s - sum(c.total_s for c in layers) - sum(rank_tail_s(s, cluster, 525568))) < 1e-15
        True
    """
    if len(stages) != strategy.num_stages:
        raise ValueError(f"{len(stages)} stages given for pp × virtual_stages = {strategy.num_stages}")
    last = len(stages) - 1
    last_rank = last % strategy.pp
    boundary = [s[-1].boundary_bytes for s in stages]
    # a cut's price on the stage before it: the sends, and a sequence-parallel run gathered and split there
    cut_s = [stage_p2p_s(strategy, cluster, boundary[k]) + stages[k][-1].cut_s if k < last else 0.0
             for k in range(len(stages))]
    ranks = []
    for r in range(strategy.pp):
        own = [k for k in range(len(stages)) if k % strategy.pp == r]
        layers = [c for k in own for c in stages[k]]
        params = sum(c.num_params for c in layers) + (tied_copy_params[r] if tied_copy_params else 0)
        sync, opt = rank_tail_s(strategy, cluster, params)
        sync += tied_sync_s[r] if tied_sync_s else 0.0  # tied weights across pipeline ranks (autoplan.cost.tied)
        flight = in_flight(strategy, r)
        buffers = sum((boundary[k - 1] if k > 0 else 0) + (boundary[k] if k < last else 0) for k in own)
        ranks.append(RankCost(
            rank=r, stages=tuple(own), layers=len(layers),
            compute_s=sum(c.forward_s + c.backward_s for c in layers),
            recompute_s=sum(c.recompute_s for c in layers),
            tp_comm_s=sum(c.tp_comm_s for c in layers) + sum(stages[k][-1].cut_s for k in own if k < last),
            p2p_s=sum(stage_p2p_s(strategy, cluster, boundary[k]) for k in own if k < last),
            num_params=params, dp_sync_s=sync, optimizer_s=opt,
            model_state_bytes=rank_state_bytes(strategy, params),
            in_flight=flight,
            activation_bytes=int(flight * sum(c.activation_bytes for c in layers)),
            transient_bytes=max(c.transient_bytes + fsdp_gather_bytes(strategy, c.num_params) for c in layers),
            p2p_buffer_bytes=buffers,
            weight_copy_bytes=sum(weight_copy_bytes(strategy, c) for c in layers),
            loss_bytes=loss_bytes(strategy, stages[last][-1]) if r == last_rank else 0,
        ))
    slow = max(ranks, key=lambda r: (r.microbatch_s, -r.rank))
    tail = max(ranks, key=lambda r: (r.tail_s, -r.rank))
    m = strategy.microbatches
    stage_s = [sum(c.total_s for c in stage) + cut_s[k] for k, stage in enumerate(stages)]
    bubble = strategy.bubble_stage_times * max(stage_s)
    step = m * slow.microbatch_s + bubble + tail.tail_s
    return PlanCost(
        strategy=strategy, ranks=tuple(ranks), capacity_bytes=cluster.device.usable_memory_bytes,
        step_time_s=step, compute_s=m * slow.compute_s, recompute_s=m * slow.recompute_s,
        comm_s=m * (slow.tp_comm_s + slow.p2p_s) + tail.dp_sync_s, bubble_s=bubble, optimizer_s=tail.optimizer_s,
        samples_per_s=global_batch_size / step if step > 0 else 0.0, global_batch_size=global_batch_size,
        stage_times=tuple(
            StageTime(sum(c.forward_s for c in stage), sum(c.backward_s for c in stage),
                      sum(c.recompute_s for c in stage),
                      sum(c.tp_comm_s for c in stage) + cut_s[k])
            for k, stage in enumerate(stages)),
    )


def estimate_breakdown(graph: ModelGraph, plan: Plan) -> PlanCost:
    """Everything :func:`estimate` computes, per pipeline rank, for explanations and tests.

    Example (two Linear layers on two pipeline stages; the last rank also holds the loss buffers):
        >>> import autoplan
        >>> from autoplan.plan import Mesh, ModelInfo
        >>> from autoplan.synthetic import mlp_graph
        >>> graph = mlp_graph(widths=(256, 1024, 256), batch=32)
        >>> plan = autoplan.Plan(model=ModelInfo("MLP", graph.fingerprint, graph.num_params),
        ...     cluster=autoplan.Cluster.preset("a100-80gb"), global_batch_size=32, microbatch_size=4,
        ...     microbatches=2, mesh=Mesh(pp=2, dp=4), schedule="1f1b", data_parallel="ddp",
        ...     stages=(autoplan.Stage(("layers.0",)), autoplan.Stage(("layers.1",))))
        >>> b = estimate_breakdown(graph, plan)
        >>> [r.num_params for r in b.ranks], b.ranks[0].loss_bytes == 0 < b.ranks[1].loss_bytes
        ([263168, 262400], True)
    """
    strategy = Strategy.of(plan)
    stages = [
        [layer_choice_cost(graph, layer, plan.cluster, strategy, tp_on, option) for layer, tp_on, option in rows]
        for rows in plan_layer_choices(graph, plan)
    ]
    result = compose(strategy, plan.cluster, stages, plan.global_batch_size,
                     tied_gradient_sync_s(graph, plan, plan.cluster), tied_copy_params(graph, plan))
    if plan.expert_parallel > 1:  # experts sharded over dp ranks (autoplan.cost.experts)
        from .experts import with_expert_parallel

        result = with_expert_parallel(graph, plan, result)
    return result


def estimate(graph: ModelGraph, plan: Plan) -> Predicted:
    """Predicted step time (one iteration over the global batch) and peak memory per stage of ``plan``.

    Example:
        >>> from autoplan.synthetic import gpt_like_graph
        >>> import autoplan
        >>> from autoplan.solve import search
        >>> from autoplan.options import PlanOptions
        >>> graph = gpt_like_graph(layers=2, hidden=256, seq=128, vocab=1000)
        >>> plan = search(graph, autoplan.Cluster.preset("a100-80gb"), PlanOptions(global_batch_size=8))
        >>> abs(estimate(graph, plan).step_time_s - plan.predicted.step_time_s) < 1e-12
        True
    """
    return estimate_breakdown(graph, plan).predicted
