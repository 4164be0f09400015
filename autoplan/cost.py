"""Cost model: pure functions from (layer figures, cluster, strategy choices) to seconds and bytes.

Every formula cites its source. Units are in the names (``_s``, ``_bytes``, ``_flops``, ``_Bps``).
This module knows nothing of solvers or plans: :mod:`autoplan.estimate` composes these pieces into the
step time and per-stage memory of a whole plan, and :mod:`autoplan.solve` searches over them.

Example:
    >>> from autoplan.cost import allreduce_s
    >>> round(allreduce_s(1e9, 8, bandwidth_Bps=100e9, latency_s=0.0), 4)   # 2·7/8·1 GB / 100 GB/s
    0.0175
"""

from __future__ import annotations

from dataclasses import dataclass

from ._checks import PRECISION_BYTES
from ._checks import ceil_div as _ceil_div
from ._checks import check_non_negative as _check_non_negative
from ._checks import check_positive_int as _check_positive_int
from ._checks import check_precision as _check_precision
from .cluster import Cluster
from .comm import (
    allgather_s,
    allreduce_s,
    group_allgather_s,
    group_allreduce_s,
    group_link,
    group_reduce_scatter_s,
    p2p_s,
    reduce_scatter_s,
)
from .comm import __all__ as _comm_all
from .comm import check_group as _check_group
from .graph import Layer, RecomputeOption, TensorParallelGroup

__all__ = [
    "StateBytes",
    "LayerCost",
    "state_bytes_per_param",
    "model_state_bytes",
    "zero_model_state_bytes",
    "compute_s",
    "layer_cost",
    "data_parallel_sync_s",
    "optimizer_step_s",
    "optimizer_step_bytes_per_param",
    "cross_entropy_bytes",
    "autocast_weight_copy_bytes",
    "in_flight_microbatches",
    "bubble_microbatches",
] + [name for name in _comm_all if name != "check_group"]

OPTIMIZERS = ("adamw", "sgd")
DATA_PARALLEL_KINDS = ("ddp", "fsdp")
SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter held for training, before any sharding."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


@dataclass(frozen=True)
class LayerCost:
    """One layer, one microbatch, one device (after tensor parallelism and recompute)."""

    forward_s: float
    backward_s: float
    recompute_s: float  # the extra forward that recompute adds to backward (0 without recompute)
    tp_comm_s: float  # tensor-parallel collectives of forward + backward
    num_params: int  # parameters this device holds for the layer (after TP, before DP/FSDP sharding)
    activation_bytes: int  # kept alive for backward (after TP and recompute)
    transient_bytes: int  # extra bytes alive only while this layer's backward runs (rematerialised activations)
    boundary_bytes: int  # output of the layer: what a pipeline cut after it sends
    # parameters the layer's matmuls read (its tensor-parallel groups' linears, a tied head's weight included),
    # after TP: what autocast casts to the low precision (see :func:`autocast_weight_copy_bytes`)
    matmul_params: int = 0

    @property
    def total_s(self) -> float:
        """Forward + backward + recompute + tensor-parallel communication."""
        return self.forward_s + self.backward_s + self.recompute_s + self.tp_comm_s



# ---------------------------------------------------------------------------------------------------------------
# Model states (weights, gradients, optimizer states)
# ---------------------------------------------------------------------------------------------------------------


def state_bytes_per_param(precision: str, optimizer: str) -> StateBytes:
    """Bytes per parameter for weights, gradients and optimizer states (ZeRO, Rajbhandari et al. 2020, §3.1).

    fp32 + AdamW: 4 (weight) + 4 (grad) + 8 (m, v). Mixed precision (bf16/fp16) + AdamW: 2 + 2 + 12 (fp32 master
    copy, m, v) — the paper's "16Ψ" with K = 12. SGD with momentum keeps one state: fp32 4 + 4 + 4; mixed
    2 + 2 + 8 (fp32 master, momentum).

    Example:
        >>> state_bytes_per_param("bf16", "adamw")
        StateBytes(params=2, grads=2, optimizer=12)
        >>> state_bytes_per_param("fp32", "sgd").total
        12
    """
    _check_precision(precision)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {OPTIMIZERS}")
    element = PRECISION_BYTES[precision]
    mixed = precision != "fp32"
    # Optimizer states are fp32 (4 bytes each); mixed precision adds the fp32 master weights (ZeRO §3.1).
    states = 2 if optimizer == "adamw" else 1
    return StateBytes(params=element, grads=element, optimizer=4 * (states + (1 if mixed else 0)))


def zero_model_state_bytes(num_params: int, dp: int, stage: int, precision: str = "bf16",
                           optimizer: str = "adamw") -> int:
    """ZeRO stage 0/1/2/3 model-state bytes per device (ZeRO §5, Figure 1).

    With p, g, k the bytes per parameter of weights, gradients and optimizer states and Ψ parameters over
    N_d data-parallel ranks: stage 0 (p + g + k)Ψ; stage 1 (P_os) (p + g)Ψ + kΨ/N_d; stage 2 (P_os+g)
    pΨ + (g + k)Ψ/N_d; stage 3 (P_os+g+p) (p + g + k)Ψ/N_d. A shard holds ⌈Ψ/N_d⌉ parameters.

    Example (the paper's Figure 1: 7.5B parameters, 64-way DP, K = 12):
        >>> [round(zero_model_state_bytes(7_500_000_000, 64, s) / 1e9, 1) for s in (0, 1, 2, 3)]
        [120.0, 31.4, 16.6, 1.9]
    """
    if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < 0:
        raise ValueError(f"num_params must be an int ≥ 0, got {num_params!r}")
    _check_positive_int("dp", dp)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    b = state_bytes_per_param(precision, optimizer)
    shard = _ceil_div(num_params, dp)
    replicated_bytes = {0: b.total, 1: b.params + b.grads, 2: b.params, 3: 0}[stage]
    sharded_bytes = b.total - replicated_bytes
    return num_params * replicated_bytes + shard * sharded_bytes


def model_state_bytes(num_params: int, precision: str, optimizer: str, dp: int, data_parallel: str) -> int:
    """Weights + gradients + optimizer states of ``num_params`` on one device; FSDP shards all three by ``dp``.

    DDP keeps a full replica (ZeRO stage 0); FSDP (FSDP2 ``fully_shard``) shards parameters, gradients and
    optimizer states (ZeRO stage 3). The unsharded parameters FSDP gathers for one layer at a time are
    transient and belong to the caller's activation/transient accounting.

    Example:
        >>> model_state_bytes(1_000_000, "bf16", "adamw", dp=4, data_parallel="ddp")
        16000000
        >>> model_state_bytes(1_000_000, "bf16", "adamw", dp=4, data_parallel="fsdp")
        4000000
    """
    if data_parallel not in DATA_PARALLEL_KINDS:
        raise ValueError(f"unknown data_parallel {data_parallel!r}; use one of {DATA_PARALLEL_KINDS}")
    stage = 3 if data_parallel == "fsdp" else 0
    return zero_model_state_bytes(num_params, dp, stage, precision, optimizer)


# ---------------------------------------------------------------------------------------------------------------
# Compute
# ---------------------------------------------------------------------------------------------------------------


def compute_s(flops: float, cluster: Cluster, precision: str) -> float:
    """FLOPs at the device's achievable rate for ``precision``: flops / (peak_flops[precision] × fraction).

    Example:
        >>> c = Cluster.preset("a100-80gb")            # 312 TFLOP/s bf16 peak × 0.5
        >>> compute_s(156e12, c, "bf16")
        1.0
    """
    _check_precision(precision)
    _check_non_negative("flops", flops)
    return flops / cluster.device.achievable_flops(precision)


# ---------------------------------------------------------------------------------------------------------------
# One layer, one microbatch, one device
# ---------------------------------------------------------------------------------------------------------------


def _group_kind(group: TensorParallelGroup) -> str:
    styles = set(group.styles.values())
    if "vocab_head" in styles:
        return "vocab_head"
    if "vocab_embedding" in styles:
        return "vocab_embedding"
    return "pair"  # colwise feeding rowwise (a lone colwise/rowwise is costed as a pair: the conservative case)


def _in_module(fqn: str, module: str) -> bool:
    return fqn == module or fqn.startswith(module + ".")


def _tp_collectives_s(group: TensorParallelGroup, nbytes: float, cluster: Cluster, tp: int,
                      tp_stride: int, input_bytes: float) -> tuple[float, float]:
    """(forward_s, backward_s) of one tensor-parallel group's collectives.

    Megatron-LM (Shoeybi et al. 2019 §3; Narayanan et al. SC'21 §3, the "f" and "g" operators): a colwise →
    rowwise pair all-reduces its output in forward (g) and its input gradient in backward (f). A
    vocabulary-parallel embedding (rows sharded, masked lookup) all-reduces its output in forward; its input
    is token ids, so backward has nothing to reduce. A vocabulary-parallel head whose logits are gathered
    (DTensor ColwiseParallel(output_layouts=Replicate())) all-gathers the logits in forward and all-reduces the
    gradient of its (replicated) input in backward.
    """
    if _group_kind(group) == "vocab_head":
        return (group_allgather_s(nbytes, cluster, tp, tp_stride),
                group_allreduce_s(input_bytes, cluster, tp, tp_stride))
    forward_s = group_allreduce_s(nbytes, cluster, tp, tp_stride)
    if _group_kind(group) == "vocab_embedding":
        return forward_s, 0.0
    return forward_s, forward_s


def layer_cost(layer: Layer, *, traced_batch_size: int, traced_dtype_bytes: int, cluster: Cluster, tp: int,
               microbatch_size: int, precision: str, recompute: RecomputeOption | None = None,
               tp_stride: int = 1) -> LayerCost:
    """Cost of ``layer`` for one microbatch of ``microbatch_size`` samples on one device.

    Figures in ``layer`` are for ``traced_batch_size`` samples at ``traced_dtype_bytes`` per element and are
    scaled linearly. ``tp > 1`` shards the layer's tensor-parallel groups (``layer.tp_groups``) and adds their
    collectives over a group of ``tp`` ranks ``tp_stride`` apart (Megatron-LM SC'21 §3; activations as in
    Korthikanti et al. 2022, Eq. 2 without sequence parallelism). ``tp`` must divide ``layer.tp_divisor``
    or the layer stays replicated.

    Scaling: FLOPs × microbatch_size / traced_batch_size; bytes of activations, outputs and collectives also
    × bytes(precision) / traced_dtype_bytes (a bf16 run of an fp32 trace halves them). Backward FLOPs are
    TP-sharded in the same proportion as forward FLOPs. A recompute option frees its saved activations (TP-sharded
    in the layer's proportion; full recompute — ``recompute.module == layer.name`` — keeps only the layer input,
    which TP replicates), costs one more forward of its module (``recompute_s``) and re-runs the forward
    collectives of the TP groups inside that module (added to ``tp_comm_s``); the rematerialised bytes are
    alive only while the layer's backward runs (``transient_bytes``).

    Fixed overhead: each microbatch's forward also costs ``cluster.device.layer_overhead_s`` whatever its size
    (kernel launches, Python and autograd dispatch), backward twice that — backward runs about two kernels per
    forward one (the gradient of a linear is two matmuls, Narayanan et al. SC'21 §5.1's 2× backward FLOPs, and
    autograd adds its own dispatch per node) — and a recompute one more forward's worth. This is what makes many
    small microbatches cost more than few large ones.

    Example:
        >>> from autoplan.graph import Layer
        >>> layer = Layer("fc", 0, "linear", flops=2_000_000, backward_flops=4_000_000, num_params=1000,
        ...               param_bytes=4000, activation_bytes=8000, output_bytes=4000)
        >>> cost = layer_cost(layer, traced_batch_size=2, traced_dtype_bytes=4, tp=1, microbatch_size=4,
        ...                   precision="bf16", cluster=Cluster.preset("a100-80gb"))
        >>> cost.activation_bytes, cost.boundary_bytes       # 2× the samples at half the element size
        (8000, 4000)
    """
    _check_positive_int("traced_batch_size", traced_batch_size)
    _check_positive_int("traced_dtype_bytes", traced_dtype_bytes)
    _check_positive_int("tp", tp)
    _check_positive_int("tp_stride", tp_stride)
    _check_positive_int("microbatch_size", microbatch_size)
    _check_precision(precision)
    if recompute is not None and not _in_module(recompute.module, layer.name):
        raise ValueError(
            f"recompute option for module {recompute.module!r} does not belong to layer {layer.name!r}; "
            f"pass one of layer.recompute_options"
        )
    batch_scale = microbatch_size / traced_batch_size
    overhead_s = cluster.device.layer_overhead_s
    bytes_scale = batch_scale * PRECISION_BYTES[precision] / traced_dtype_bytes

    divisor = layer.tp_divisor
    sharded = tp > 1 and divisor > 0 and divisor % tp == 0
    groups = layer.tp_groups if sharded else ()
    if sharded:
        _check_group(cluster, tp, tp_stride)
    group_params = sum(g.num_params for g in groups)
    group_flops = sum(g.forward_flops for g in groups)
    group_activation = sum(g.activation_bytes for g in groups)
    # A group may name a weight another layer owns (a head tied to the embedding): shard only what this
    # layer owns.
    sharded_params = min(group_params, layer.num_params)
    num_params = layer.num_params - sharded_params + _ceil_div(sharded_params, tp)
    forward_flops = layer.flops - group_flops + group_flops / tp
    flops_ratio = forward_flops / layer.flops if layer.flops > 0 else 1.0
    activation = layer.activation_bytes - group_activation + group_activation / tp
    activation_ratio = activation / layer.activation_bytes if layer.activation_bytes > 0 else 1.0

    recompute_s = 0.0
    kept_activation = activation
    recompute_groups: tuple[TensorParallelGroup, ...] = ()
    if recompute is not None:
        saved = min(recompute.saved_activation_bytes, layer.activation_bytes)
        if recompute.module == layer.name:
            # Full recompute keeps the checkpoint input, which TP does not shard (Korthikanti et al. 2022 §5).
            kept_activation = min(activation, layer.activation_bytes - saved)
        else:
            kept_activation = activation - saved * activation_ratio
        kept_activation = max(0.0, kept_activation)
        recompute_s = (compute_s(recompute.forward_flops * batch_scale * flops_ratio, cluster, precision)
                       + overhead_s)
        recompute_groups = tuple(g for g in groups if all(_in_module(m, recompute.module) for m in g.styles))

    tp_forward_s = tp_backward_s = tp_recompute_s = 0.0
    for group in groups:
        nbytes = group.allreduce_bytes * bytes_scale
        # The head's input gradient has the size of its input: a linear's input elements = FLOPs / (2 × out
        # features), and the vocabulary (out features) is the group's divisor.
        input_bytes = group.forward_flops * traced_dtype_bytes / (2 * group.divisor) * bytes_scale
        fwd_s, bwd_s = _tp_collectives_s(group, nbytes, cluster, tp, tp_stride, min(input_bytes, nbytes))
        tp_forward_s += fwd_s
        tp_backward_s += bwd_s
        if group in recompute_groups:
            tp_recompute_s += fwd_s

    # The linears of every group but a vocabulary embedding (a lookup, which autocast leaves in fp32); a group may
    # read a weight another layer owns (the tied head), whose copy this layer's matmul makes all the same.
    matmul_params = sum(_ceil_div(g.num_params, tp) if sharded else g.num_params
                        for g in layer.tp_groups if _group_kind(g) != "vocab_embedding")
    return LayerCost(
        forward_s=compute_s(forward_flops * batch_scale, cluster, precision) + overhead_s,
        backward_s=compute_s(layer.backward_flops * flops_ratio * batch_scale, cluster, precision) + 2 * overhead_s,
        recompute_s=recompute_s,
        tp_comm_s=tp_forward_s + tp_backward_s + tp_recompute_s,
        num_params=num_params,
        activation_bytes=int(round(kept_activation * bytes_scale)),
        transient_bytes=int(round((activation - kept_activation) * bytes_scale)),
        boundary_bytes=int(round(layer.output_bytes * bytes_scale)),
        matmul_params=matmul_params,
    )


def cross_entropy_bytes(logits_elements: float) -> int:
    """Peak bytes a cross-entropy loss over ``logits_elements`` logits adds at the start of backward.

    ``F.cross_entropy`` is log_softmax + nll_loss and runs in fp32 (also under autocast, whose fp32 op list
    holds both): it keeps the fp32 log-probabilities for backward, and backward briefly holds their gradient
    and the logits' gradient beside them: 3 × 4 bytes per logit. The traced model ends at the logits, so this
    is not in any layer's figures; for a GPT with a 50k vocabulary it rivals the activations of several blocks.

    Example:
        >>> cross_entropy_bytes(8 * 1024 * 50304) / 2**30       # GPT-2 vocabulary, 8 × 1024 tokens
        4.60546875
    """
    _check_non_negative("logits_elements", logits_elements)
    return int(3 * 4 * logits_elements)


def autocast_weight_copy_bytes(matmul_params: int, precision: str, data_parallel: str, dp: int) -> int:
    """Low-precision copies of the matmul weights that ``torch.autocast`` keeps for backward, on one device.

    Under autocast (what the executor runs for DDP and for dp = 1) the parameters stay fp32 and each matmul
    casts its weight to bf16/fp16; the linear saves that copy for its input gradient, so it lives until the
    backward: 2 bytes × the matmul parameters (after TP). Autocast caches the cast of a leaf tensor for the
    whole autocast region (``torch.autocast(cache_enabled=True)``, the default; the cache is cleared when the
    outermost region exits), so every microbatch run inside one region shares one copy: the executor enters a
    region per microbatch without pipelining (its backward ends before the next forward) and one region around
    the whole pipeline schedule, so one copy is alive at any time, not one per microbatch in flight (checked:
    two forwards in one region save the same bf16 weight storage, two regions two). Under FSDP (dp > 1,
    ``MixedPrecisionPolicy(param_dtype=bf16)``) the all-gathered bf16 parameters take its place: they are the
    per-layer FSDP transient, freed after each layer and gathered again for its backward (PyTorch FSDP2
    ``fully_shard`` docs, ``reshard_after_forward``), so there is no separate copy. DDP composed with tensor or
    pipeline parallelism runs FSDP2's ``replicate`` with the same policy instead of autocast: its bf16
    unsharded parameters stay from forward to backward (replicate does not reshard), again one copy, of every
    parameter (norms and embeddings too, which this count leaves out). fp32 casts nothing.

    Example:
        >>> autocast_weight_copy_bytes(1_000_000, "bf16", "ddp", dp=8)
        2000000
        >>> autocast_weight_copy_bytes(1_000_000, "bf16", "fsdp", dp=8), autocast_weight_copy_bytes(1_000_000,
        ...     "fp32", "ddp", dp=8)
        (0, 0)
    """
    if isinstance(matmul_params, bool) or not isinstance(matmul_params, int) or matmul_params < 0:
        raise ValueError(f"matmul_params must be an int ≥ 0, got {matmul_params!r}")
    _check_precision(precision)
    _check_positive_int("dp", dp)
    if data_parallel not in DATA_PARALLEL_KINDS:
        raise ValueError(f"unknown data_parallel {data_parallel!r}; use one of {DATA_PARALLEL_KINDS}")
    if precision == "fp32" or (data_parallel == "fsdp" and dp > 1):
        return 0
    return matmul_params * PRECISION_BYTES[precision]


# ---------------------------------------------------------------------------------------------------------------
# Data parallelism and the optimizer step
# ---------------------------------------------------------------------------------------------------------------


#: Bytes per element of gradient reductions. Mixed precision still reduces gradients in fp32: under autocast the
#: parameters, hence their gradients, are fp32; FSDP2 is given ``MixedPrecisionPolicy(reduce_dtype=float32)``;
#: Megatron-LM accumulates and all-reduces bf16 gradients in fp32 (``--accumulate-allreduce-grads-in-fp32``).
GRAD_REDUCE_BYTES = 4


def data_parallel_sync_s(num_params: int, cluster: Cluster, *, dp: int, stride: int, data_parallel: str,
                         precision: str, grad_reduce_bytes: int = GRAD_REDUCE_BYTES) -> float:
    """Gradient synchronisation of one device's ``num_params`` per step: DDP all-reduce of gradients; FSDP
    all-gather of weights in forward and backward plus reduce-scatter of gradients (ZeRO §7).

    ``num_params`` is what the device's stage holds after tensor parallelism and before FSDP sharding; the
    data-parallel group is ``dp`` ranks ``stride`` (= tp) apart. Gradients travel at ``grad_reduce_bytes`` per
    element (fp32 by default, see :data:`GRAD_REDUCE_BYTES`; pass ``state_bytes_per_param(...).grads`` for
    ZeRO's bf16 accounting), gathered weights at the precision's element size. DDP: one (hierarchical)
    all-reduce of 2(n−1)/n·Ψ·g bytes; FSDP: 2 all-gathers of (n−1)/n·Ψ·p bytes and 1 reduce-scatter of
    (n−1)/n·Ψ·g bytes, 1.5× the DDP volume when p = g (ZeRO §7.2.2), two-level across nodes
    (:func:`group_allgather_s`). The caller decides how much of it overlaps compute.

    Example:
        >>> c = Cluster.preset("a100-80gb")               # 8 GPUs, 300 GB/s NVLink
        >>> round(data_parallel_sync_s(1_000_000_000, c, dp=8, stride=1, data_parallel="ddp",
        ...                            precision="bf16"), 4)        # 2·7/8·4 GB / 300 GB/s + 14·5 µs
        0.0234
    """
    if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < 0:
        raise ValueError(f"num_params must be an int ≥ 0, got {num_params!r}")
    _check_positive_int("dp", dp)
    _check_positive_int("grad_reduce_bytes", grad_reduce_bytes)
    if data_parallel not in DATA_PARALLEL_KINDS:
        raise ValueError(f"unknown data_parallel {data_parallel!r}; use one of {DATA_PARALLEL_KINDS}")
    _check_precision(precision)
    _check_group(cluster, dp, stride)
    if dp == 1:
        return 0.0
    grad_bytes = num_params * grad_reduce_bytes
    if data_parallel == "ddp":
        return group_allreduce_s(grad_bytes, cluster, dp, stride)
    weight_bytes = num_params * PRECISION_BYTES[precision]
    return (2 * group_allgather_s(weight_bytes, cluster, dp, stride)
            + group_reduce_scatter_s(grad_bytes, cluster, dp, stride))


def optimizer_step_bytes_per_param(precision: str, optimizer: str) -> int:
    """Bytes read + written per parameter by one fused optimizer update.

    AdamW (Loshchilov & Hutter 2019, Algorithm 2; torch.optim.AdamW(fused=True) touches each element once):
    fp32 reads w, g, m, v (16) and writes w, m, v (12) = 28; mixed precision reads the fp32 master, m, v and a
    bf16 gradient (14) and writes master, m, v and the bf16 working copy (14) = 28 (autocast and FSDP2 mixed
    precision update fp32 weights from fp32 gradients: the fp32 count, also 28). SGD with momentum: fp32
    reads w, g, buf (12), writes w, buf (8) = 20; mixed reads master, buf, g (10), writes master, buf, bf16
    copy (10) = 20.

    Example:
        >>> optimizer_step_bytes_per_param("bf16", "adamw")
        28
    """
    b = state_bytes_per_param(precision, optimizer)
    if precision == "fp32":
        # read weights, grads, states; write weights, states
        return b.params + b.grads + b.optimizer + b.params + b.optimizer
    # read fp32 master + states (b.optimizer), low-precision grads; write master + states and the working copy
    return b.optimizer + b.grads + b.optimizer + b.params


def optimizer_step_s(num_params: int, cluster: Cluster, precision: str, optimizer: str) -> float:
    """The optimizer update of ``num_params`` on one device, memory-bandwidth bound.

    Time = num_params × :func:`optimizer_step_bytes_per_param` / device.memory_bandwidth_Bps (an elementwise
    update does ~1 FLOP per byte, far below any GPU's FLOP/byte ridge point: roofline, Williams et al. 2009).

    Example:
        >>> c = Cluster.preset("h100-80gb")               # 3.35 TB/s HBM3
        >>> round(optimizer_step_s(1_000_000_000, c, "bf16", "adamw") * 1e3, 2)   # 28 GB / 3.35 TB/s
        8.36
    """
    if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < 0:
        raise ValueError(f"num_params must be an int ≥ 0, got {num_params!r}")
    return num_params * optimizer_step_bytes_per_param(precision, optimizer) / cluster.device.memory_bandwidth_Bps


# ---------------------------------------------------------------------------------------------------------------
# Pipeline schedules
# ---------------------------------------------------------------------------------------------------------------


def _check_schedule(schedule: str, pp: int, virtual_stages: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
    _check_positive_int("pp", pp)
    _check_positive_int("virtual_stages", virtual_stages)
    if schedule != "interleaved" and virtual_stages != 1:
        raise ValueError(f"schedule {schedule!r} has one stage per rank; virtual_stages must be 1, "
                         f"got {virtual_stages} (use schedule='interleaved')")


def in_flight_microbatches(schedule: str, stage: int, pp: int, microbatches: int, virtual_stages: int = 1) -> int:
    """Microbatches whose activations a pipeline rank holds at its peak (GPipe: all; 1F1B: pp − stage,
    Narayanan et al. SC'21 §2.2).

    The unit is one microbatch through one of the rank's chunks: with ``virtual_stages`` = v chunks per rank
    a chunk holds 1/v of the rank's layers, so memory = this × Σ activation_bytes of the rank's layers / v
    (v = 1: the rank's whole layers). GPipe (Huang et al. 2019) runs every forward first: ``microbatches``.
    1F1B (PipeDream-Flush, SC'21 §2.2.1): rank s warms up with pp − s forwards, min(pp − s, m). Interleaved
    1F1B (SC'21 §2.2.2): rank s runs w = 2(pp − 1 − s) + (v − 1)·pp warm-up chunk forwards (Megatron-LM
    ``forward_backward_pipelining_with_interleaving``; torch ``ScheduleInterleaved1F1B`` warmup_ops), so
    min(w + 1, m·v) chunk activations are alive. On rank 0 that is (pp + (pp − 1)/v) whole-rank
    microbatches, Korthikanti et al. 2022 §4.2.3's factor (1 + (pp − 1)/(pp·v)) on pp microbatches.
    An "interleaved" schedule with v = 1 is plain 1F1B.

    Example:
        >>> in_flight_microbatches("1f1b", stage=0, pp=4, microbatches=8)
        4
        >>> in_flight_microbatches("interleaved", stage=0, pp=4, microbatches=8, virtual_stages=2)   # chunks
        11
    """
    _check_schedule(schedule, pp, virtual_stages)
    _check_positive_int("microbatches", microbatches)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < pp:
        raise ValueError(f"stage must be an int in [0, pp={pp}), got {stage!r}")
    if schedule == "gpipe":
        return microbatches
    if schedule == "1f1b" or virtual_stages == 1:
        return min(pp - stage, microbatches)
    warmup_chunks = 2 * (pp - 1 - stage) + (virtual_stages - 1) * pp
    return min(warmup_chunks + 1, microbatches * virtual_stages)


def bubble_microbatches(schedule: str, pp: int, virtual_stages: int = 1) -> float:
    """Idle time of a pipeline in units of one stage's per-microbatch time: (pp − 1) / virtual_stages
    (GPipe, 1F1B: Huang et al. 2019; interleaved: Narayanan et al. SC'21 §2.2.2).

    Step time of the pipeline = (microbatches + this) × the slowest rank's forward + backward per microbatch.

    Example:
        >>> bubble_microbatches("1f1b", pp=8), bubble_microbatches("interleaved", pp=8, virtual_stages=4)
        (7, 1.75)
    """
    _check_schedule(schedule, pp, virtual_stages)
    if schedule == "interleaved":
        return (pp - 1) / virtual_stages
    return pp - 1
