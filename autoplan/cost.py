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

from .cluster import Cluster
from .graph import Layer, RecomputeOption

__all__ = [
    "StateBytes",
    "LayerCost",
    "state_bytes_per_param",
    "model_state_bytes",
    "zero_model_state_bytes",
    "allreduce_s",
    "allgather_s",
    "reduce_scatter_s",
    "p2p_s",
    "group_link",
    "group_allreduce_s",
    "compute_s",
    "layer_cost",
    "data_parallel_sync_s",
    "optimizer_step_s",
    "in_flight_microbatches",
    "bubble_microbatches",
]

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


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

    @property
    def total_s(self) -> float:
        """Forward + backward + recompute + tensor-parallel communication."""
        return self.forward_s + self.backward_s + self.recompute_s + self.tp_comm_s


def state_bytes_per_param(precision: str, optimizer: str) -> StateBytes:
    """Bytes per parameter for weights, gradients and optimizer states (ZeRO, Rajbhandari et al. 2020, §3.1)."""
    raise NotImplementedError


def model_state_bytes(num_params: int, precision: str, optimizer: str, dp: int, data_parallel: str) -> int:
    """Weights + gradients + optimizer states of ``num_params`` on one device; FSDP shards all three by ``dp``."""
    raise NotImplementedError


def zero_model_state_bytes(num_params: int, dp: int, stage: int, precision: str = "bf16",
                           optimizer: str = "adamw") -> int:
    """ZeRO stage 0/1/2/3 model-state bytes per device (ZeRO §5, Figure 1)."""
    raise NotImplementedError


def allreduce_s(nbytes: float, n: int, *, bandwidth_Bps: float, latency_s: float) -> float:
    """Ring all-reduce: 2(n−1) steps of nbytes/n (Thakur et al. 2005; NCCL performance docs)."""
    raise NotImplementedError


def allgather_s(nbytes: float, n: int, *, bandwidth_Bps: float, latency_s: float) -> float:
    """Ring all-gather of a result of ``nbytes`` in total: (n−1) steps of nbytes/n."""
    raise NotImplementedError


def reduce_scatter_s(nbytes: float, n: int, *, bandwidth_Bps: float, latency_s: float) -> float:
    """Ring reduce-scatter of an input of ``nbytes``: (n−1) steps of nbytes/n."""
    raise NotImplementedError


def p2p_s(nbytes: float, *, bandwidth_Bps: float, latency_s: float) -> float:
    """One point-to-point send: latency + nbytes / bandwidth."""
    raise NotImplementedError


def group_link(cluster: Cluster, group_size: int, stride: int) -> tuple[float, float]:
    """(bandwidth_Bps, latency_s) of a group of ``group_size`` ranks ``stride`` apart in the flat rank order.

    The group stays in one node when ``group_size × stride ≤ devices_per_node``; otherwise it crosses nodes.
    """
    raise NotImplementedError


def group_allreduce_s(nbytes: float, cluster: Cluster, group_size: int, stride: int) -> float:
    """All-reduce over a group laid out as in :func:`group_link`; hierarchical (intra-node reduce-scatter,
    inter-node all-reduce, intra-node all-gather) when it spans nodes."""
    raise NotImplementedError


def compute_s(flops: float, cluster: Cluster, precision: str) -> float:
    """FLOPs at the device's achievable rate for ``precision``."""
    raise NotImplementedError


def layer_cost(layer: Layer, *, traced_batch_size: int, traced_dtype_bytes: int, cluster: Cluster, tp: int,
               microbatch_size: int, precision: str, recompute: RecomputeOption | None = None,
               tp_stride: int = 1) -> LayerCost:
    """Cost of ``layer`` for one microbatch of ``microbatch_size`` samples on one device.

    Figures in ``layer`` are for ``traced_batch_size`` samples at ``traced_dtype_bytes`` per element and are
    scaled linearly. ``tp > 1`` shards the layer's tensor-parallel groups (``layer.tp_groups``) and adds their
    collectives over a group of ``tp`` ranks ``tp_stride`` apart (Megatron-LM SC'21 §3; activations as in
    Korthikanti et al. 2022, Eq. 2 without sequence parallelism). ``tp`` must divide ``layer.tp_divisor``
    or the layer stays replicated.
    """
    raise NotImplementedError


def data_parallel_sync_s(num_params: int, cluster: Cluster, *, dp: int, stride: int, data_parallel: str,
                         precision: str) -> float:
    """Gradient synchronisation of one device's ``num_params`` per step: DDP all-reduce of gradients; FSDP
    all-gather of weights in forward and backward plus reduce-scatter of gradients (ZeRO §7)."""
    raise NotImplementedError


def optimizer_step_s(num_params: int, cluster: Cluster, precision: str, optimizer: str) -> float:
    """The optimizer update of ``num_params`` on one device, memory-bandwidth bound."""
    raise NotImplementedError


def in_flight_microbatches(schedule: str, stage: int, pp: int, microbatches: int, virtual_stages: int = 1) -> int:
    """Microbatches whose activations a pipeline rank holds at its peak (GPipe: all; 1F1B: pp − stage,
    Narayanan et al. SC'21 §2.2)."""
    raise NotImplementedError


def bubble_microbatches(schedule: str, pp: int, virtual_stages: int = 1) -> float:
    """Idle time of a pipeline in units of one stage's per-microbatch time: (pp − 1) / virtual_stages
    (GPipe, 1F1B: Huang et al. 2019; interleaved: Narayanan et al. SC'21 §2.2.2)."""
    raise NotImplementedError
