"""A layout's discrete choices (:class:`Strategy`) and the per-rank terms they fix: the data-parallel sync and
optimizer tail, model-state bytes, the low-precision weight copy, the loss buffers, FSDP's per-layer transient,
pipeline sends and the microbatches in flight. :mod:`autoplan.cost.plan_cost` composes them into a step; the
solver reads the same functions (the tail and state bytes as lines in a rank's parameters).

Example:
    >>> s = Strategy(pp=4, dp=2, tp=1, microbatch_size=1, microbatches=8, schedule="1f1b", data_parallel="fsdp")
    >>> s.describe(), s.num_stages, s.mixed_precision
    ('pp4×dp2×tp1 1f1b mb=1×8 fsdp', 4, 'fsdp')
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .. import cost
from ..cluster import Cluster
from ..mixed_precision import mixed_precision_mode
from ..plan import Mesh, Plan
from ..vocabulary import PRECISION_BYTES

__all__ = ["Strategy", "rank_tail_s", "rank_tail_terms", "rank_optimizer_s", "rank_state_bytes",
           "rank_state_bytes_per_param", "weight_copy_bytes_per_param", "weight_copy_bytes", "loss_bytes",
           "fsdp_gather_bytes", "p2p_link", "stage_p2p_s", "in_flight"]


@dataclass(frozen=True)
class Strategy:
    """The discrete choices of a layout, without its stage cuts: what one solver configuration fixes."""

    pp: int
    dp: int
    tp: int
    microbatch_size: int
    microbatches: int
    schedule: str
    data_parallel: str
    virtual_stages: int = 1
    precision: str = "bf16"
    optimizer: str = "adamw"
    sequence_parallel: bool = False  # Megatron sequence parallelism in every layer that allows it (tp > 1)
    fsdp_reshard: str = "step"  # FSDP between microbatches: keep the gathered weights, or reshard ("microbatch")

    @cached_property
    def fsdp_keeps_weights(self) -> bool:
        """:func:`autoplan.cost.fsdp_keeps_weights` of this layout (``Plan.fsdp_keeps_weights``'s rule)."""
        return cost.fsdp_keeps_weights(self.microbatches, self.pp, self.fsdp_reshard)

    def contention(self, cluster: Cluster) -> float:
        """:func:`autoplan.cost.compute_contention` of this layout on ``cluster``: how much slower than alone its
        ranks compute when they share processors (1 on a cluster with a device per rank), averaged over the
        microbatches' schedule, where a pipeline's waiting ranks hand their processor to the busy ones."""
        return cost.compute_contention(cluster, pp=self.pp, microbatches=self.microbatches, schedule=self.schedule,
                                       virtual_stages=self.virtual_stages)

    @staticmethod
    def step_end_contention(cluster: Cluster) -> float:
        """How much slower than alone a rank runs the work every rank does at once after the microbatches (the
        optimizer step), when ranks share processors: every rank busy, whatever the pipeline."""
        return cost.compute_contention(cluster, pp=1, microbatches=1, schedule="1f1b")

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    @cached_property  # read for every layer choice of every strategy the search costs
    def mixed_precision(self) -> str:
        """How the executor runs this layout's precision (:func:`autoplan.mixed_precision.mixed_precision_mode`)."""
        return mixed_precision_mode(self.precision, self.data_parallel, Mesh(self.pp, self.dp, self.tp))

    @property
    def bubble_stage_times(self) -> int:
        """Pipeline bubble in units of the slowest stage's per-microbatch time: (pp − 1) for every schedule
        (:func:`autoplan.cost.bubble_microbatches` counts it in rank-times of v stages each)."""
        return round(cost.bubble_microbatches(self.schedule, self.pp, self.virtual_stages) * self.virtual_stages)

    def describe(self) -> str:
        """``pp2×dp4×tp1 1f1b mb=2×8 ddp`` (with ``v=2`` for interleaved, ``fsdp reshard/mb`` for FSDP that
        reshards every microbatch)."""
        v = f" v={self.virtual_stages}" if self.virtual_stages > 1 else ""
        reshard = " reshard/mb" if self.fsdp_reshard == "microbatch" else ""
        return (f"pp{self.pp}×dp{self.dp}×tp{self.tp}{'+sp' if self.sequence_parallel else ''} {self.schedule}{v} "
                f"mb={self.microbatch_size}×{self.microbatches} {self.data_parallel}{reshard}")

    @classmethod
    def of(cls, plan: Plan) -> "Strategy":
        return cls(plan.mesh.pp, plan.mesh.dp, plan.mesh.tp, plan.microbatch_size, plan.microbatches,
                   plan.schedule, plan.data_parallel, plan.virtual_stages, plan.precision, plan.optimizer,
                   plan.sequence_parallel, plan.fsdp_reshard)



def rank_tail_s(strategy: Strategy, cluster: Cluster, num_params: float) -> tuple[float, float]:
    """(data-parallel sync, optimizer step) seconds of a pipeline rank holding ``num_params`` after TP. The sync
    includes the runtime wrappers' fixed costs over the step (:mod:`autoplan.cost.runtime`: the stage roots'
    data-parallel hooks and the pipeline runtime's schedule actions, 0 on the presets) and the step's loss
    collectives.

    FSDP runs the optimizer on its 1/dp shard only (ZeRO-3, Rajbhandari et al. 2020 §5.3).

    Example (10⁹ parameters, DDP over one 8-GPU A100 node):
        >>> from autoplan import Cluster
        >>> [round(x, 4) for x in rank_tail_s(Strategy(1, 8, 1, 1, 1, "1f1b", "ddp"), Cluster.preset("a100-80gb"),
        ...                                   10**9)]          # 2·7/8·4 GB / 300 GB/s + the loss's 70 µs; 28 GB
        [0.0235, 0.0137]
    """
    sync = cost.data_parallel_sync_s(int(num_params), cluster, dp=strategy.dp, stride=strategy.tp,
                                     data_parallel=strategy.data_parallel, precision=strategy.precision,
                                     microbatches=strategy.microbatches, pp=strategy.pp,
                                     reshard=strategy.fsdp_reshard) + _root_s(strategy, cluster)
    shard = num_params / strategy.dp if strategy.data_parallel == "fsdp" else num_params
    return sync, rank_optimizer_s(strategy, cluster, int(-(-shard // 1)))


def rank_optimizer_s(strategy: Strategy, cluster: Cluster, updated_params: int) -> float:
    """The optimizer step of a rank that updates ``updated_params``: :func:`autoplan.cost.optimizer_step_s`, the
    rank's own memory-bound work, stretched like its compute when ranks share processors — with every rank busy,
    as every rank steps at once after its pipeline has drained (:meth:`Strategy.step_end_contention`; four ranks
    on two cores ran the GPT's AdamW step in 14–15 ms against 4–5 ms for one rank alone).

    Example:
        >>> from autoplan import Cluster
        >>> round(rank_optimizer_s(Strategy(1, 8, 1, 1, 1, "1f1b", "ddp"), Cluster.preset("a100-80gb"), 10**9), 4)
        0.0137
    """
    return (cost.optimizer_step_s(updated_params, cluster, strategy.precision, strategy.optimizer)
            * strategy.step_end_contention(cluster))


def _root_s(strategy: Strategy, cluster: Cluster) -> float:
    """The runtime's fixed costs over a step (:mod:`autoplan.cost.runtime`): the stage roots' data-parallel hooks,
    the pipeline runtime's schedule actions and the loss collectives, per-step constants of the layout, so they
    join the tail, where the solver sees them in α."""
    return (cost.data_parallel_root_s(cluster, dp=strategy.dp, data_parallel=strategy.data_parallel,
                                      tp=strategy.tp, pp=strategy.pp, microbatches=strategy.microbatches,
                                      schedule=strategy.schedule, virtual_stages=strategy.virtual_stages,
                                      reshard=strategy.fsdp_reshard)
            + cost.pipeline_runtime_s(cluster, pp=strategy.pp, microbatches=strategy.microbatches,
                                      schedule=strategy.schedule, virtual_stages=strategy.virtual_stages)
            + cost.loss_sync_s(cluster, pp=strategy.pp, dp=strategy.dp, tp=strategy.tp))


def rank_tail_terms(strategy: Strategy, cluster: Cluster) -> tuple[float, float]:
    """(alpha_s, beta_s_per_param): :func:`rank_tail_s` as an affine function α + β·P of a rank's parameters.

    α is the data-parallel collectives' latency (:func:`autoplan.cost.data_parallel_sync_terms`) and the runtime's
    fixed costs (:mod:`autoplan.cost.runtime`, the loss collectives among them); β adds the collectives'
    seconds per parameter and the optimizer's bytes per parameter over the memory bandwidth
    (:func:`autoplan.cost.optimizer_step_bytes_per_param`), divided by dp under FSDP, which updates its shard only.
    The solver's tail constraint is this line; :func:`rank_tail_s` differs from it only by FSDP's rounding of
    the shard up to a whole parameter.

    Example:
        >>> from autoplan import Cluster
        >>> s, c = Strategy(1, 8, 1, 1, 1, "1f1b", "ddp"), Cluster.preset("a100-80gb")
        >>> alpha_s, beta_s = rank_tail_terms(s, c)   # 14 ring steps of 5 µs, twice (gradients, loss); per 10⁹
        >>> round(alpha_s * 1e6), round(beta_s * 1e9 * 1e3, 2)   # parameters: 23.33 ms all-reduce + 28 GB / 2.039 TB/s
        (140, 37.07)
        >>> abs(sum(rank_tail_s(s, c, 10**9)) - (alpha_s + beta_s * 10**9)) < 1e-15
        True
    """
    latency_s, sync_per_param_s = cost.data_parallel_sync_terms(
        cluster, dp=strategy.dp, stride=strategy.tp, data_parallel=strategy.data_parallel,
        precision=strategy.precision, microbatches=strategy.microbatches, pp=strategy.pp, reshard=strategy.fsdp_reshard)
    latency_s += _root_s(strategy, cluster)
    shard = strategy.dp if strategy.data_parallel == "fsdp" else 1
    optimizer_per_param_s = (cost.optimizer_param_s(cluster, strategy.precision, strategy.optimizer)
                             * strategy.step_end_contention(cluster) / shard)
    return latency_s, sync_per_param_s + optimizer_per_param_s


def rank_state_bytes_per_param(strategy: Strategy) -> float:
    """Model-state bytes per parameter of a rank on one device: :func:`rank_state_bytes` without FSDP's rounding
    of the shard up to a whole parameter (ZeRO §3.1 bytes per parameter; FSDP divides them by dp).

    Example:
        >>> rank_state_bytes_per_param(Strategy(1, 4, 1, 1, 1, "1f1b", "fsdp")), rank_state_bytes(
        ...     Strategy(1, 4, 1, 1, 1, "1f1b", "fsdp"), 1000) / 1000
        (4.0, 4.0)
    """
    per_param = cost.state_bytes_per_param(strategy.precision, strategy.optimizer).total
    return (per_param / strategy.dp if strategy.data_parallel == "fsdp" else float(per_param)) + _held(strategy)


def _held(strategy: Strategy) -> int:
    """FSDP's weights and gradient accumulators kept unsharded through a step of several microbatches or a
    pipeline (:func:`autoplan.cost.fsdp_held_bytes_per_param`), per parameter."""
    return cost.fsdp_held_bytes_per_param(strategy.precision, strategy.data_parallel, strategy.dp,
                                          strategy.microbatches, strategy.pp, strategy.fsdp_reshard)


def rank_state_bytes(strategy: Strategy, num_params: int) -> int:
    """Weights, gradients and optimizer states of a rank's ``num_params`` on one of its devices."""
    return (cost.model_state_bytes(int(num_params), strategy.precision, strategy.optimizer, strategy.dp,
                                   strategy.data_parallel) + _held(strategy) * int(num_params))


def weight_copy_bytes_per_param(strategy: Strategy) -> int:
    """Bytes per matmul parameter of the low-precision weight copy under ``strategy``: the element size when its
    mixed precision keeps one (autocast, ``replicate``), else 0 (fp32, sharded FSDP).

    Example:
        >>> [weight_copy_bytes_per_param(Strategy(1, 4, 1, 1, 1, "1f1b", kind)) for kind in ("ddp", "fsdp")]
        [2, 0]
    """
    return PRECISION_BYTES[strategy.precision] if cost.holds_weight_copy(strategy.mixed_precision) else 0


def weight_copy_bytes(strategy: Strategy, layer: cost.LayerCost) -> int:
    """Bytes of the low-precision weight copy ``layer`` keeps from forward to backward on one device under
    ``strategy``: autocast's copy of its matmul weights (``layer.matmul_params``); under ``replicate`` (DDP with
    TP or PP) FSDP2's unsharded low-precision copy of every parameter the layer holds — norms, embeddings and
    routed experts too: its ``MixedPrecisionPolicy`` casts the whole module and ``replicate`` keeps the copy until
    backward — and of a tied weight its matmul reads (a head tied to the embedding owns none of its parameters but
    holds the weight on its pipeline stage): the larger of the two counts; none in fp32 or under sharded FSDP
    (:func:`weight_copy_bytes_per_param`). A tied pair on one pipeline rank (pp = 1) shares one tensor, which this
    counts for both layers.

    Example (a layer of 1,000 parameters, 800 of them in matmuls, in bf16):
        >>> lc = cost.LayerCost(0.0, 0.0, 0.0, 0.0, num_params=1000, activation_bytes=0, transient_bytes=0,
        ...                     boundary_bytes=0, matmul_params=800)
        >>> [weight_copy_bytes(Strategy(pp, 2, 1, 1, 4, "1f1b", "ddp"), lc) for pp in (1, 2)]  # autocast, replicate
        [1600, 2000]
    """
    per_param = weight_copy_bytes_per_param(strategy)
    if strategy.mixed_precision == "replicate":
        return per_param * max(layer.num_params, layer.matmul_params)
    return per_param * layer.matmul_params


def loss_bytes(strategy: Strategy, final: cost.LayerCost) -> int:
    """The loss buffers of one microbatch on the last rank: cross-entropy over the final layer's output
    (``final.boundary_bytes`` is one microbatch at the plan's precision; the loss runs in fp32)."""
    return cost.cross_entropy_bytes(final.boundary_bytes / PRECISION_BYTES[strategy.precision])


def fsdp_gather_bytes(strategy: Strategy, num_params: int) -> int:
    """FSDP's per-layer transient: the layer's all-gathered weights plus its unsharded gradients before the
    reduce-scatter (FSDP2 frees both once the layer is done; Zhao et al. 2023, PyTorch FSDP §3.2)."""
    if strategy.data_parallel != "fsdp" or strategy.dp == 1:
        return 0
    sb = cost.state_bytes_per_param(strategy.precision, strategy.optimizer)
    if _held(strategy):  # weights and accumulators are held (rank_state_bytes): the layer's fresh gradient only
        return int(num_params) * sb.params
    return int(num_params) * (sb.params + sb.grads)


def p2p_link(strategy: Strategy, cluster: Cluster) -> tuple[float, float]:
    """(bandwidth_Bps, latency_s) between neighbouring pipeline ranks, ``dp·tp`` ranks apart: the pipeline's
    slowest hop, inter-node as soon as the pp ranks of one (dp, tp) coordinate span more than a node."""
    return cost.group_link(cluster, strategy.pp, strategy.dp * strategy.tp)


def stage_p2p_s(strategy: Strategy, cluster: Cluster, boundary_bytes: int) -> float:
    """Send the stage's output forward and receive its gradient back, for one microbatch
    (:func:`autoplan.cost.group_p2p_s`: measured sends when the cluster was calibrated)."""
    return 2 * cost.group_p2p_s(boundary_bytes, cluster, strategy.pp, strategy.dp * strategy.tp)


def in_flight(strategy: Strategy, rank: int) -> float:
    """Microbatches (whole-rank equivalents) whose activations pipeline rank ``rank`` holds at its peak.

    :func:`autoplan.cost.in_flight_microbatches` counts chunk activations, a chunk being 1/v of the rank's
    layers, so v chunks make one whole-rank microbatch (rank 0 of interleaved 1F1B: pp + (pp − 1)/v,
    Korthikanti et al. 2022 §4.2.3).

    Example:
        >>> in_flight(Strategy(4, 1, 1, 1, 8, "interleaved", "ddp", virtual_stages=2), 0)   # 11 chunks
        5.5
    """
    chunks = cost.in_flight_microbatches(strategy.schedule, rank, strategy.pp, strategy.microbatches,
                                         strategy.virtual_stages)
    return chunks / strategy.virtual_stages
