"""One layer, one microbatch, one device: compute, tensor-parallel collectives, activation and transient bytes.

Example:
    >>> from autoplan.cost.layer import compute_s
    >>> from autoplan import Cluster
    >>> round(compute_s(218.4e12, Cluster.preset("a100-80gb"), "bf16"), 6)   # 312 TFLOP/s bf16 peak × 0.7
    1.0
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .._checks import check_non_negative as _check_non_negative
from .._checks import check_positive_int as _check_positive_int
from .._checks import check_precision as _check_precision
from ..cluster import Cluster
from ..cluster_tables import group_layer_overhead_s
from ..graph import Layer, RecomputeOption, TensorParallelGroup
from ..names import in_module
from ..vocabulary import PRECISION_BYTES, fused_sizes
from .._checks import ceil_div as _ceil_div
from .collectives import Collective
from .collectives import check_group as _check_group
from .collectives import group_allgather_s, group_allreduce_s, group_alltoall_s
from .row_exchange import row_exchange_collectives

__all__ = ["LayerCost", "compute_s", "memory_bound_s", "layer_cost", "FORWARD_PASSES", "BACKWARD_PASSES"]


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
    # the tensor-parallel collectives of one microbatch (forward, backward, recompute), priced as tp_comm_s
    tp_collectives: tuple[Collective, ...] = ()
    # what a pipeline cut right after the layer adds to the stage before it, per microbatch, beside the send:
    # a sequence-parallel run cut there is gathered and split again (autoplan.cost.sequence.sequence_edge_collectives)
    cut_s: float = 0.0
    cut_collectives: tuple[Collective, ...] = ()

    @property
    def total_s(self) -> float:
        """Forward + backward + recompute + tensor-parallel communication."""
        return self.forward_s + self.backward_s + self.recompute_s + self.tp_comm_s



# ---------------------------------------------------------------------------------------------------------------
# Compute
# ---------------------------------------------------------------------------------------------------------------


def compute_s(flops: float, cluster: Cluster, precision: str, matmul_flops: float | None = None) -> float:
    """FLOPs at the device's achievable rate for ``precision``: flops / (peak_flops[precision] × fraction), the
    fraction measured for matmuls of ``matmul_flops`` FLOPs each when the device has a calibrated table
    (:meth:`autoplan.Device.achievable_flops`), else the device's one fraction.

    Example:
        >>> c = Cluster.preset("a100-80gb")            # 312 TFLOP/s bf16 peak × 0.7
        >>> round(compute_s(218.4e12, c, "bf16"), 6)
        1.0
    """
    _check_precision(precision)
    _check_non_negative("flops", flops)
    return flops / cluster.device.achievable_flops(precision, matmul_flops)


def _forward_matmul_s(layer: Layer, groups: tuple[TensorParallelGroup, ...], tp: int, pair_sharded: bool,
                      batch_scale: float, cluster: Cluster, precision: str) -> float:
    """Seconds of a layer's forward matmuls for one microbatch, each priced at the efficiency of its own size.

    A tensor-parallel group's linears split its FLOPs evenly (one matmul each, ``len(group.styles)``); the rest
    of the layer's matmul FLOPs (attention's QKᵀ and softmax·V, or a layer without groups) counts as two
    matmuls. Under TP every matmul shrinks by t (SC'21 §3.1), which is what lowers a small model's efficiency.
    The sizes matter only with a calibrated efficiency table; otherwise this is compute_s of the FLOPs.
    """
    pieces = []
    rest = float(layer.forward_flops)
    for group in layer.tp_groups:
        linears = max(1, len(group.styles))
        flops = group.forward_flops * batch_scale / (tp if group in groups else 1)
        pieces.append((flops, flops / linears))
        rest -= group.forward_flops
    rest = max(0.0, rest) * batch_scale / (tp if pair_sharded else 1)
    pieces.append((rest, rest / 2))
    return sum(compute_s(f, cluster, precision, size) for f, size in pieces if f > 0)


#: Bytes of device memory traffic per byte a layer saves for backward, outside its matmuls. FLOPs count matmuls
#: only (torch.utils.flop_counter); the elementwise ops around them (norms, softmax, dropout, GeLU, residual adds)
#: do ~1 FLOP per byte and run at memory bandwidth (roofline, Williams et al. 2009). Each saved tensor was written
#: by the forward op that made it from an input it read: 2 passes. Backward reads it and the output gradient and
#: writes the input gradient: 3 passes. (Korthikanti et al. 2022 §4 lists what a block saves: 34·s·b·h bytes
#: plus 5·a·s²·b for materialised attention scores.)
FORWARD_PASSES = 2
BACKWARD_PASSES = 3


def memory_bound_s(nbytes: float, cluster: Cluster) -> float:
    """Seconds to move ``nbytes`` through device memory: nbytes / device.memory_bandwidth_Bps.

    Example:
        >>> from autoplan import Cluster
        >>> round(memory_bound_s(2.039e9, Cluster.preset("a100-80gb")) * 1e3, 3)   # 2 GB at 2,039 GB/s
        1.0
    """
    _check_non_negative("nbytes", nbytes)
    return nbytes / cluster.device.memory_bandwidth_Bps


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


def _tp_group_collectives(group: TensorParallelGroup, nbytes: float, tp: int, input_bytes: float,
                          input_gradient_bytes: float) -> tuple[tuple[Collective, ...], tuple[Collective, ...]]:
    """(forward, backward) collectives of one tensor-parallel group for one microbatch.

    Megatron-LM (Shoeybi et al. 2019 §3; Narayanan et al. SC'21 §3, the "f" and "g" operators): a colwise →
    rowwise pair all-reduces its output in forward (g) and its input gradient in backward (f). A
    vocabulary-parallel embedding (rows sharded, masked lookup) all-reduces its output in forward; its input
    is token ids, so backward has nothing to reduce. A vocabulary-parallel head whose logits are gathered
    (DTensor ColwiseParallel(output_layouts=Replicate())) all-gathers the logits in forward and all-reduces the
    gradient of its (replicated) input in backward.
    """
    kind = _group_kind(group)
    if kind == "vocab_head":
        return (Collective("all_gather", nbytes, 1, tp, "tp"),), (Collective("all_reduce", input_bytes, 1, tp, "tp"),)
    forward = (Collective("all_reduce", nbytes, 1, tp, "tp"),)
    if kind == "vocab_embedding":
        return forward, ()
    return forward, (Collective("all_reduce", input_gradient_bytes, 1, tp, "tp"),)


def _priced_s(collectives: tuple[Collective, ...], cluster: Cluster, tp_stride: int) -> float:
    """Seconds of ``collectives`` over groups of their size ``tp_stride`` apart (the two-level forms)."""
    def one(c: Collective) -> float:
        if c.kind == "all_to_all":
            return group_alltoall_s(c.nbytes, cluster, c.group_size, tp_stride, c.moved)
        price = group_allreduce_s if c.kind == "all_reduce" else group_allgather_s
        return price(c.nbytes, cluster, c.group_size, tp_stride)

    return sum(c.count * one(c) for c in collectives)


def layer_cost(layer: Layer, *, traced_batch_size: int, traced_dtype_bytes: int, cluster: Cluster, tp: int,
               microbatch_size: int, precision: str, recompute: RecomputeOption | None = None,
               tp_stride: int = 1, contention: float = 1.0, fsdp_unit: bool | int = False,
               per_step_s: float = 0.0, fsdp_keeps_weights: bool = False,
               exchanged_elements: Mapping[str, tuple[int, ...]] | None = None) -> LayerCost:
    """Cost of ``layer`` for one microbatch of ``microbatch_size`` samples on one device.

    Figures in ``layer`` are for ``traced_batch_size`` samples at ``traced_dtype_bytes`` per element and are
    scaled linearly. ``tp > 1`` shards the layer's tensor-parallel groups (``layer.tp_groups``) and adds their
    collectives over a group of ``tp`` ranks ``tp_stride`` apart (Megatron-LM SC'21 §3; activations as in
    Korthikanti et al. 2022, Eq. 2 without sequence parallelism). ``tp`` must divide ``layer.tp_divisor``
    or the layer stays replicated.

    Scaling: FLOPs × microbatch_size / traced_batch_size; bytes of activations, outputs and collectives also
    × bytes(precision) / traced_dtype_bytes (a bf16 run of an fp32 trace halves them, as bf16 weights run it;
    :func:`autoplan.cost.layer_choice.as_low_precision_runs` gives a layout that runs autocast the bytes it keeps
    wide). Backward FLOPs are
    TP-sharded in the same proportion as forward FLOPs. A recompute option frees its saved activations (TP-sharded
    in the layer's proportion; full recompute — ``recompute.module == layer.name`` — keeps only the layer input,
    which TP replicates), costs one more forward of its module (``recompute_s``) and re-runs the forward
    collectives of the TP groups inside that module (added to ``tp_comm_s``); the rematerialised bytes are
    alive only while the layer's backward runs (``transient_bytes``).

    A ``colwise:a+b+c`` projection (unequal fused parts) also exchanges its weight's rows among the tp ranks: one
    all-to-all per exchanged tensor in forward, one in backward, and again in a recompute that runs it
    (:mod:`autoplan.cost.row_exchange`). ``exchanged_elements`` maps each such projection of the layer to the
    elements of those tensors (:func:`autoplan.cost.row_exchange.exchanged_elements`); a sharded layer holding one
    without an entry is refused.

    Fixed overhead: each microbatch's forward also costs ``cluster.device.layer_overhead_s`` whatever its size
    (kernel launches, Python and autograd dispatch), backward twice that — backward runs about two kernels per
    forward one (the gradient of a linear is two matmuls, Narayanan et al. SC'21 §5.1's 2× backward FLOPs, and
    autograd adds its own dispatch per node) — and a recompute one more forward's worth. This is what makes many
    small microbatches cost more than few large ones. A recompute also pays ``recompute_overhead_s``, the
    checkpoint's own fixed time (its saved-tensor hooks). A tensor-parallel layer adds ``tp_layer_overhead_s``
    (DTensor dispatch) and, with ``fsdp_unit``, a layer wrapped by ``fully_shard`` adds
    ``fsdp_layer_overhead_s`` (its hooks), each charged like ``layer_overhead_s``; a calibrated device holds
    both per group size (:func:`autoplan.cluster_tables.group_layer_overhead_s`), read at ``tp`` and at
    ``fsdp_unit`` when that is the FSDP group's size (an int ≥ 2; ``True``: a unit of unknown size); with
    ``fsdp_keeps_weights`` (:func:`autoplan.cost.fsdp_keeps_weights`) the unit's hooks neither gather nor reshard
    per microbatch and the "fsdp_keep" figure is read instead.

    Matmuls are priced at the efficiency of their own size when the device has a calibrated table
    (:meth:`autoplan.Device.achievable_flops`). ``contention`` (≥ 1) stretches everything the rank computes —
    matmuls, memory-bound ops, overhead, not the collectives, which are measured with every rank taking part —
    when ranks share processors (:func:`autoplan.cost.compute_contention`). ``per_step_s`` is the layer's fixed
    work per step outside its microbatches, already divided by the step's microbatches
    (:func:`autoplan.cost.layer_step_overhead_s`, as the rank spends them: its compute part already stretched by
    the contention, its collectives' latencies not): charged with backward as it is, so that m microbatches add it
    once.

    Example:
        >>> from autoplan.graph import Layer
        >>> layer = Layer("fc", 0, "linear", forward_flops=2_000_000, backward_flops=4_000_000, num_params=1000,
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
    exchanged_elements = exchanged_elements or {}
    if recompute is not None and not in_module(recompute.module, layer.name):
        raise ValueError(
            f"recompute option for module {recompute.module!r} does not belong to layer {layer.name!r}; "
            f"pass one of layer.recompute_options"
        )
    _check_non_negative("per_step_s", per_step_s)
    if not contention >= 1:
        raise ValueError(f"contention must be ≥ 1 (how much slower than alone a rank computes), got {contention}")
    batch_scale = microbatch_size / traced_batch_size
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
    if any(_group_kind(g) == "pair" for g in groups):
        # The tracer counts matmul-like ops only (torch.utils.flop_counter), and the matmuls of a layer with a
        # Megatron pair that lie outside its linears are attention's score and value products (QKᵀ, softmax·V):
        # they run on the rank's own heads, so they shard too (Narayanan et al. SC'21 §3.1; Eq. 3's 4·b·s²·h term
        # is split over t like the rest). Left replicated, they made a tp=8 block at h = 6144, s = 2048 44% slower.
        forward_flops = layer.forward_flops / tp
    else:
        forward_flops = layer.forward_flops - group_flops + group_flops / tp
    flops_ratio = forward_flops / layer.forward_flops if layer.forward_flops > 0 else 1.0
    device = cluster.device
    fsdp_group = fsdp_unit if fsdp_unit is not True and fsdp_unit >= 2 else 0
    overhead_s = (device.layer_overhead_s + (group_layer_overhead_s(device, "tp", tp) if groups else 0.0)
                  + ((group_layer_overhead_s(device, "fsdp_keep" if fsdp_keeps_weights else "fsdp", fsdp_group)
                      if fsdp_group else device.fsdp_layer_overhead_s) if fsdp_unit else 0.0))
    pair_sharded = any(_group_kind(g) == "pair" for g in groups)
    matmul_s = _forward_matmul_s(layer, groups, tp, pair_sharded, batch_scale, cluster, precision)
    # backward and recompute run matmuls of the forward's sizes (a linear's two gradients): the forward's rate
    seconds_per_flop = (matmul_s / (forward_flops * batch_scale) if forward_flops * batch_scale > 0
                        else 1 / device.achievable_flops(precision))
    activation = layer.activation_bytes - group_activation + group_activation / tp

    recompute_s = 0.0
    kept_activation = activation
    recompute_groups: tuple[TensorParallelGroup, ...] = ()
    if recompute is not None:
        saved = min(recompute.saved_activation_bytes, layer.activation_bytes)
        if recompute.module == layer.name:
            # Full recompute keeps the checkpoint input, which TP does not shard (Korthikanti et al. 2022 §5).
            kept_activation = min(activation, layer.activation_bytes - saved)
        else:
            # A module's saved bytes lie partly inside the layer's pairs (each rank frees 1/t of them) and partly
            # outside (each rank frees them whole). The trace records no such split per option, so the pairs'
            # bytes are taken first: the freed bytes are never over-stated (an attention core inside a pair frees
            # exactly saved/t), and the memory predicted is never below what the rank keeps.
            in_pairs = min(saved, group_activation)
            kept_activation = activation - (saved - in_pairs + in_pairs / tp)
        kept_activation = max(0.0, kept_activation)
        recompute_s = contention * (recompute.forward_flops * batch_scale * flops_ratio * seconds_per_flop
                                    + memory_bound_s(FORWARD_PASSES * (activation - kept_activation) * bytes_scale,
                                                     cluster)
                                    + overhead_s + device.recompute_overhead_s)
        # Non-reentrant checkpointing (what the executor uses) stops recomputing once every saved tensor is back
        # (torch.utils.checkpoint's early stop): a pre-norm block's last all-reduce feeds only the residual add,
        # which saves nothing, so it is not re-run; a post-norm block's last norm saves the sum, so every
        # all-reduce is (both counted on gloo in tests/test_collective_counts.py).
        recompute_groups = tuple(g for g in groups if all(in_module(m, recompute.module) for m in g.styles)
                                 and recompute.reaches(g.styles))

    tp_forward: list[Collective] = []
    tp_backward: list[Collective] = []
    tp_recompute: list[Collective] = []
    for group in groups:
        nbytes = group.output_bytes * bytes_scale
        # the head's input gradient has the size of its input, which the tracer recorded; a pair's has its output's
        # shape, in its input's dtype (which autocast may keep wider than the output's)
        fwd, bwd = _tp_group_collectives(group, nbytes, tp, group.input_bytes * bytes_scale,
                                         (group.input_gradient_bytes or group.output_bytes) * bytes_scale)
        tp_forward += fwd
        tp_backward += bwd
        if group in recompute_groups:
            tp_recompute += fwd
        for fqn, style in group.styles.items():
            if fused_sizes(style) is None:
                continue
            if fqn not in exchanged_elements:
                raise ValueError(f"{fqn} ({style}) exchanges its weight's rows among the tp ranks; pass its elements "
                                 f"as exchanged_elements (autoplan.cost.row_exchange.exchanged_elements)")
            rows = row_exchange_collectives(exchanged_elements[fqn], tp, PRECISION_BYTES[precision],
                                            fused_sizes(style))
            tp_forward += rows
            tp_backward += rows
            if recompute is not None and in_module(fqn, recompute.module):  # its linear saves the rows it got
                tp_recompute += rows
    tp_collectives = tuple(tp_forward + tp_backward + tp_recompute)

    # The linears of every group but a vocabulary embedding (a lookup, which autocast leaves in fp32); a group may
    # read a weight another layer owns (the tied head), whose copy this layer's matmul makes all the same.
    matmul_params = sum(_ceil_div(g.num_params, tp) if sharded else g.num_params
                        for g in layer.tp_groups if _group_kind(g) != "vocab_embedding")
    return LayerCost(
        forward_s=contention * (matmul_s + overhead_s
                                + memory_bound_s(FORWARD_PASSES * activation * bytes_scale, cluster)),
        backward_s=contention * (layer.backward_flops * flops_ratio * batch_scale * seconds_per_flop
                                 + 2 * overhead_s + memory_bound_s(BACKWARD_PASSES * activation * bytes_scale,
                                                                   cluster)) + per_step_s,
        recompute_s=recompute_s,
        tp_comm_s=_priced_s(tp_collectives, cluster, tp_stride),
        num_params=num_params,
        activation_bytes=int(round(kept_activation * bytes_scale)),
        transient_bytes=int(round((activation - kept_activation) * bytes_scale)),
        boundary_bytes=int(round(layer.output_bytes * bytes_scale)),
        matmul_params=matmul_params,
        tp_collectives=tp_collectives,
    )
