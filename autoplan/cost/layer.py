"""One layer, one microbatch, one device: compute, tensor-parallel collectives, activation and transient bytes.

Example:
    >>> from autoplan.cost.layer import compute_s
    >>> from autoplan import Cluster
    >>> compute_s(156e12, Cluster.preset("a100-80gb"), "bf16")      # 312 TFLOP/s bf16 peak × 0.5
    1.0
"""

from __future__ import annotations

from dataclasses import dataclass

from .._checks import check_non_negative as _check_non_negative
from .._checks import check_positive_int as _check_positive_int
from .._checks import check_precision as _check_precision
from ..cluster import Cluster
from ..graph import Layer, RecomputeOption, TensorParallelGroup
from ..names import in_module
from ..vocabulary import PRECISION_BYTES
from .._checks import ceil_div as _ceil_div
from .collectives import check_group as _check_group
from .collectives import group_allgather_s, group_allreduce_s

__all__ = ["LayerCost", "compute_s", "layer_cost"]


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
    if recompute is not None and not in_module(recompute.module, layer.name):
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
    forward_flops = layer.forward_flops - group_flops + group_flops / tp
    flops_ratio = forward_flops / layer.forward_flops if layer.forward_flops > 0 else 1.0
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
        recompute_groups = tuple(g for g in groups if all(in_module(m, recompute.module) for m in g.styles))

    tp_forward_s = tp_backward_s = tp_recompute_s = 0.0
    for group in groups:
        nbytes = group.output_bytes * bytes_scale
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
