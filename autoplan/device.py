"""One device's figures (:class:`Device`): peak FLOP/s, memory, bandwidth and the fixed costs
:mod:`autoplan.calibrate` measures; :class:`autoplan.Cluster` holds one kind of device and its links.

Example:
    >>> d = Device("toy", 8 * GiB, {"fp32": 1e12, "bf16": 4e12, "fp16": 4e12})
    >>> d.usable_memory_bytes == 8 * GiB - d.memory_headroom_bytes, d.achievable_flops("bf16") / 1e12
    (True, 2.0)
"""

from __future__ import annotations

from dataclasses import dataclass

from .cluster_tables import _efficiency_table, _group_overhead_table, _interpolate_log
from .vocabulary import PRECISIONS

__all__ = ["Device", "GiB", "DEVICE_KINDS", "MEASURED_SECONDS_FIELDS"]

GiB = 2**30
DEVICE_KINDS = ("cuda", "cpu")
#: The device's measured fixed costs, in seconds: ≥ 0, and left out of the JSON while 0 (the presets'), so that a
#: cluster without them writes the JSON it wrote before they existed.
MEASURED_SECONDS_FIELDS = ("layer_overhead_s", "tp_layer_overhead_s", "fsdp_layer_overhead_s",
                           "optimizer_tensor_overhead_s", "dtensor_optimizer_tensor_overhead_s", "optimizer_param_s",
                           "pipeline_stage_overhead_s", "recompute_overhead_s")


@dataclass(frozen=True)
class Device:
    """One accelerator (or one CPU rank).

    Args:
        name: a label, e.g. ``"A100-SXM4-80GB"``.
        memory_bytes: memory one rank may use, in bytes.
        peak_flops: dense peak FLOP/s per precision (``"fp32"``, ``"bf16"``, ``"fp16"``).
        achievable_flops_fraction: the fraction of peak a training matmul reaches (matmuls only: the cost model
            prices elementwise ops at ``memory_bandwidth_Bps``).
        memory_headroom_bytes: memory the runtime keeps for itself (CUDA context, allocator slack), in bytes.
        memory_bandwidth_Bps: device memory bandwidth in bytes/s.
        kind: ``"cuda"`` or ``"cpu"``: the torch device type and backend the executor uses.
        layer_overhead_s: fixed seconds one layer's forward costs per microbatch whatever its size (kernel
            launches, Python and autograd dispatch); backward is charged twice this. 0 (the default for a
            device built by hand, and what a cluster JSON written before the field loads with) charges none.
        tp_layer_overhead_s: fixed seconds a tensor-parallel layer's forward costs per microbatch on top of
            ``layer_overhead_s`` (DTensor's sharding propagation and redistribution per op); backward 2×.
        fsdp_layer_overhead_s: the same for a layer wrapped by FSDP2 ``fully_shard`` / ``replicate`` (its pre-
            and post-forward/backward hooks); backward 2×.
        optimizer_tensor_overhead_s: fixed seconds an optimizer step (and ``zero_grad``) costs per parameter
            tensor whatever its size (the foreach kernels' per-tensor launches and Python), plain tensors.
        dtensor_optimizer_tensor_overhead_s: the same per DTensor parameter (FSDP2, ``replicate`` or tensor
            parallelism): every optimizer op dispatches through DTensor.
        optimizer_param_s: seconds the optimizer step costs per parameter as torch runs it on this device (the
            default ``torch.optim.AdamW``: several passes over each tensor, with temporaries), one rank alone; in
            place of the fused kernel's bytes over ``memory_bandwidth_Bps``
            (:func:`autoplan.cost.optimizer_step_s`). 0 (the presets): the fused kernel's.
        pipeline_stage_overhead_s: fixed seconds the pipeline runtime costs per stage and microbatch beyond the
            stage's layers and sends (``torch.distributed.pipelining``'s schedule actions, microbatch splitting,
            the receive buffers and the loss call), one rank alone; charged per stage-time of a step with pp > 1
            (:func:`autoplan.cost.pipeline_runtime_s`). 0 (the presets): none.
        recompute_overhead_s: fixed seconds the executor's recompute (non-reentrant ``torch.utils.checkpoint``)
            adds per recomputed layer and microbatch beyond running the layer's forward again (its saved-tensor
            pack and unpack hooks, the RNG state it keeps), one rank alone. 0 (the presets): none.
        matmul_efficiency: per precision, measured ``(flops_per_matmul, fraction_of_peak)`` points, increasing in
            FLOPs; the cost model interpolates the fraction for each matmul's size (log-linear, clamped at the
            ends) in place of ``achievable_flops_fraction``. Empty (the presets): one fraction for every size.
        group_layer_overhead: per wrapper (``"tp"``, ``"fsdp"``, ``"fsdp_keep"``, ``"replicate"``:
            :data:`autoplan.cluster_tables.GROUP_OVERHEAD_KINDS`), measured ``(group size, seconds)`` points of its
            extra fixed forward seconds per layer, in place of the two size-free figures above (interpolated in log
            group size, :func:`autoplan.cluster_tables.group_layer_overhead_s`). Empty (the presets): size-free.

    Example:
        >>> d = Device("toy", 16 * GiB, {"fp32": 1e12, "bf16": 4e12, "fp16": 4e12}, achievable_flops_fraction=0.5)
        >>> d.achievable_flops("bf16")
        2000000000000.0
    """

    name: str
    memory_bytes: int
    peak_flops: dict[str, float]
    achievable_flops_fraction: float = 0.5
    memory_headroom_bytes: int = 0
    memory_bandwidth_Bps: float = 2.0e12  # device memory bandwidth (optimizer step, elementwise ops)
    kind: str = "cuda"  # "cuda" or "cpu": which torch device and backend the executor uses
    layer_overhead_s: float = 0.0  # fixed forward seconds per layer and microbatch (launch + dispatch)
    tp_layer_overhead_s: float = 0.0  # extra fixed forward seconds of a tensor-parallel (DTensor) layer
    fsdp_layer_overhead_s: float = 0.0  # extra fixed forward seconds of an FSDP2-wrapped layer (hooks)
    optimizer_tensor_overhead_s: float = 0.0  # fixed optimizer-step seconds per parameter tensor
    dtensor_optimizer_tensor_overhead_s: float = 0.0  # the same per DTensor parameter
    optimizer_param_s: float = 0.0  # optimizer-step seconds per parameter as run here (0: fused kernel's bytes)
    pipeline_stage_overhead_s: float = 0.0  # pipeline runtime's fixed seconds per stage and microbatch
    recompute_overhead_s: float = 0.0  # checkpoint's fixed seconds per recomputed layer and microbatch
    # precision → ((flops_per_matmul, fraction_of_peak), ...), measured by autoplan.calibrate
    matmul_efficiency: tuple[tuple[str, tuple[tuple[float, float], ...]], ...] = ()
    group_layer_overhead: tuple[tuple[str, tuple[tuple[int, float], ...]], ...] = ()  # kind → ((n, s), ...)

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0:
            raise ValueError(f"Device.memory_bytes must be positive, got {self.memory_bytes}")
        if not isinstance(self.peak_flops, dict):
            raise ValueError(f"Device.peak_flops must be a dict precision → FLOP/s, got {self.peak_flops!r}")
        missing = [p for p in PRECISIONS if p not in self.peak_flops]
        if missing:
            raise ValueError(f"Device.peak_flops needs an entry for each of {PRECISIONS}; missing {missing}")
        bad = {p: f for p, f in self.peak_flops.items() if not f > 0}
        if bad:
            raise ValueError(f"Device.peak_flops must be positive FLOP/s; got {bad}")
        if not 0 < self.achievable_flops_fraction <= 1:
            raise ValueError(
                f"Device.achievable_flops_fraction must be in (0, 1], got {self.achievable_flops_fraction}"
            )
        if not 0 <= self.memory_headroom_bytes < self.memory_bytes:
            raise ValueError(
                f"Device.memory_headroom_bytes must be in [0, memory_bytes={self.memory_bytes}), "
                f"got {self.memory_headroom_bytes}"
            )
        if not self.memory_bandwidth_Bps > 0:
            raise ValueError(f"Device.memory_bandwidth_Bps must be positive, got {self.memory_bandwidth_Bps}")
        if self.kind not in DEVICE_KINDS:
            raise ValueError(f"Device.kind must be one of {DEVICE_KINDS}, got {self.kind!r}")
        for attr in MEASURED_SECONDS_FIELDS:
            if not getattr(self, attr) >= 0:
                raise ValueError(f"Device.{attr} must be ≥ 0 seconds, got {getattr(self, attr)}")
        object.__setattr__(self, "matmul_efficiency", _efficiency_table(self.matmul_efficiency))
        object.__setattr__(self, "group_layer_overhead", _group_overhead_table(self.group_layer_overhead))

    def __hash__(self) -> int:
        # peak_flops is a dict: hash its items so clusters can key caches.
        return hash((self.name, self.memory_bytes, tuple(sorted(self.peak_flops.items())),
                     self.achievable_flops_fraction, self.memory_headroom_bytes, self.memory_bandwidth_Bps,
                     self.kind, self.layer_overhead_s, self.tp_layer_overhead_s, self.fsdp_layer_overhead_s,
                     self.optimizer_tensor_overhead_s, self.dtensor_optimizer_tensor_overhead_s,
                     self.optimizer_param_s, self.pipeline_stage_overhead_s, self.recompute_overhead_s,
                     self.matmul_efficiency,
                     self.group_layer_overhead))

    @property
    def usable_memory_bytes(self) -> int:
        return self.memory_bytes - self.memory_headroom_bytes

    def achievable_flops(self, precision: str, matmul_flops: float | None = None) -> float:
        """FLOP/s a training matmul of ``matmul_flops`` FLOPs reaches at ``precision``: the peak times the
        measured efficiency at that size (:attr:`matmul_efficiency`, interpolated in log FLOPs) when there is a
        table for the precision and a size is given, else times ``achievable_flops_fraction``.

        Example:
            >>> d = Device("toy", GiB, {"fp32": 1e9, "bf16": 1e9, "fp16": 1e9},
            ...            matmul_efficiency={"fp32": [(1e3, 0.1), (1e5, 0.5)]})
            >>> [round(d.achievable_flops(p, f) / 1e6) for p, f in (("fp32", 1e4), ("fp32", 1e9), ("bf16", 1e4))]
            [300, 500, 500]
        """
        if precision not in self.peak_flops:
            raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
        table = dict(self.matmul_efficiency).get(precision)
        if not table or matmul_flops is None:
            return self.peak_flops[precision] * self.achievable_flops_fraction
        return self.peak_flops[precision] * _interpolate_log(table, matmul_flops)
