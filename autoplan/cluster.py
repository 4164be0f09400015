"""Devices and clusters: the hardware figures the cost model reads.

Example:
    >>> import autoplan
    >>> cluster = autoplan.Cluster.preset("a100-80gb", nodes=2)
    >>> cluster.world_size, cluster.device.memory_bytes // 2**30
    (16, 80)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

__all__ = ["Device", "Cluster", "PRESETS"]

GiB = 2**30
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Device:
    """One accelerator (or one CPU rank).

    Args:
        name: a label, e.g. ``"A100-SXM4-80GB"``.
        memory_bytes: memory one rank may use, in bytes.
        peak_flops: dense peak FLOP/s per precision (``"fp32"``, ``"bf16"``, ``"fp16"``).
        achievable_flops_fraction: the fraction of peak a large training matmul reaches (MFU-style).
        memory_headroom_bytes: memory the runtime keeps for itself (CUDA context, allocator slack), in bytes.
        memory_bandwidth_Bps: device memory bandwidth in bytes/s.
        kind: ``"cuda"`` or ``"cpu"``: the torch device type and backend the executor uses.
    """

    name: str
    memory_bytes: int
    peak_flops: dict[str, float]
    achievable_flops_fraction: float = 0.5
    memory_headroom_bytes: int = 0
    memory_bandwidth_Bps: float = 2.0e12  # device memory bandwidth (optimizer step, elementwise ops)
    kind: str = "cuda"  # "cuda" or "cpu": which torch device and backend the executor uses

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0:
            raise ValueError(f"Device.memory_bytes must be positive, got {self.memory_bytes}")
        missing = [p for p in PRECISIONS if p not in self.peak_flops]
        if missing:
            raise ValueError(f"Device.peak_flops needs an entry for each of {PRECISIONS}; missing {missing}")
        if not 0 < self.achievable_flops_fraction <= 1:
            raise ValueError(
                f"Device.achievable_flops_fraction must be in (0, 1], got {self.achievable_flops_fraction}"
            )

    @property
    def usable_memory_bytes(self) -> int:
        return self.memory_bytes - self.memory_headroom_bytes

    def achievable_flops(self, precision: str) -> float:
        """FLOP/s a training matmul reaches at ``precision``."""
        if precision not in self.peak_flops:
            raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
        return self.peak_flops[precision] * self.achievable_flops_fraction


# Vendor figures. A100: NVIDIA A100 Tensor Core GPU datasheet (312 TFLOP/s dense BF16/FP16, 19.5 FP32,
# NVLink 3 600 GB/s bidirectional = 300 GB/s each way). H100 SXM: NVIDIA H100 datasheet (989 TFLOP/s dense
# BF16/FP16, 67 FP32, NVLink 4 900 GB/s bidirectional = 450 GB/s each way). Inter-node: DGX A100 has one
# 200 Gb/s HDR InfiniBand NIC per GPU (25 GB/s), DGX H100 one 400 Gb/s NDR NIC per GPU (50 GB/s).
# Memory bandwidth: 1,555 / 2,039 GB/s (A100 40/80 GB), 3,350 GB/s (H100 SXM).
# Achievable fraction: Megatron-LM reaches 52% of A100 peak on GPT-3 175B (Narayanan et al., SC'21, Table 1).
_A100_FLOPS = {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12}
_H100_FLOPS = {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12}


def _cpu_device() -> Device:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 16 * GiB
    # A gloo rank on a laptop-class core: ~50 GFLOP/s fp32 sgemm, no fast low precision.
    return Device(
        name="cpu",
        memory_bytes=int(total),
        peak_flops={"fp32": 100e9, "bf16": 100e9, "fp16": 100e9},
        achievable_flops_fraction=0.5,
        memory_headroom_bytes=300 * 2**20,  # one python + torch process
        memory_bandwidth_Bps=10e9,
        kind="cpu",
    )


PRESETS: dict[str, dict] = {
    "a100-40gb": dict(
        device=Device("A100-SXM4-40GB", 40 * GiB, _A100_FLOPS, 0.5, 2 * GiB, 1.555e12),
        devices_per_node=8,
        intra_node_bandwidth_Bps=300e9,
        inter_node_bandwidth_Bps=25e9,
        intra_node_latency_s=5e-6,
        inter_node_latency_s=10e-6,
    ),
    "a100-80gb": dict(
        device=Device("A100-SXM4-80GB", 80 * GiB, _A100_FLOPS, 0.5, 2 * GiB, 2.039e12),
        devices_per_node=8,
        intra_node_bandwidth_Bps=300e9,
        inter_node_bandwidth_Bps=25e9,
        intra_node_latency_s=5e-6,
        inter_node_latency_s=10e-6,
    ),
    "h100-80gb": dict(
        device=Device("H100-SXM5-80GB", 80 * GiB, _H100_FLOPS, 0.45, 2 * GiB, 3.35e12),
        devices_per_node=8,
        intra_node_bandwidth_Bps=450e9,
        inter_node_bandwidth_Bps=50e9,
        intra_node_latency_s=5e-6,
        inter_node_latency_s=10e-6,
    ),
    # gloo ranks sharing this machine's memory bus: loopback TCP, a few GB/s.
    "cpu": dict(
        device=None,  # built at call time from this machine's memory
        devices_per_node=4,
        intra_node_bandwidth_Bps=2e9,
        inter_node_bandwidth_Bps=1e9,
        intra_node_latency_s=50e-6,
        inter_node_latency_s=100e-6,
    ),
}


@dataclass(frozen=True)
class Cluster:
    """``nodes`` × ``devices_per_node`` identical devices.

    Bandwidths are per device and per direction in bytes/s; latencies are the alpha term of one message.

    Example:
        >>> c = Cluster(nodes=2, devices_per_node=4, device=PRESETS["a100-80gb"]["device"])
        >>> c.world_size
        8
    """

    nodes: int
    devices_per_node: int
    device: Device
    intra_node_bandwidth_Bps: float = 300e9
    inter_node_bandwidth_Bps: float = 25e9
    intra_node_latency_s: float = 5e-6
    inter_node_latency_s: float = 10e-6
    name: str = "custom"

    def __post_init__(self) -> None:
        for attr in ("nodes", "devices_per_node"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Cluster.{attr} must be a positive int, got {value!r}")
        for attr in ("intra_node_bandwidth_Bps", "inter_node_bandwidth_Bps"):
            if getattr(self, attr) <= 0:
                raise ValueError(f"Cluster.{attr} must be positive, got {getattr(self, attr)}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @classmethod
    def preset(cls, name: str, nodes: int = 1, devices_per_node: int | None = None) -> "Cluster":
        """A cluster of ``nodes`` nodes of a named kind: "a100-40gb", "a100-80gb", "h100-80gb" or "cpu".

        Example:
            >>> Cluster.preset("h100-80gb", nodes=4).world_size
            32
        """
        if name not in PRESETS:
            raise ValueError(f"unknown cluster preset {name!r}; choose one of {sorted(PRESETS)}")
        spec = dict(PRESETS[name])
        if spec["device"] is None:
            spec["device"] = _cpu_device()
        if devices_per_node is not None:
            spec["devices_per_node"] = devices_per_node
        return cls(nodes=nodes, name=name, **spec)

    @classmethod
    def detect(cls) -> "Cluster":
        """This job's cluster under torchrun (WORLD_SIZE, LOCAL_WORLD_SIZE, device type and memory).

        Outside torchrun it describes a world of one on this machine.

        Example:
            >>> Cluster.detect().world_size >= 1
            True
        """
        import torch

        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if world % local:
            raise ValueError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}")
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            base = "h100-80gb" if "H100" in props.name else "a100-80gb"
            if "A100" in props.name and props.total_memory < 60 * GiB:
                base = "a100-40gb"
            spec = dict(PRESETS[base])
            device = spec.pop("device")
            spec["device"] = Device(
                props.name, props.total_memory, device.peak_flops, device.achievable_flops_fraction,
                device.memory_headroom_bytes, device.memory_bandwidth_Bps,
            )
            spec["devices_per_node"] = local
            return cls(nodes=world // local, name=f"detected-{base}", **spec)
        spec = dict(PRESETS["cpu"])
        cpu = _cpu_device()
        spec["device"] = Device(
            "cpu", cpu.memory_bytes // local, cpu.peak_flops, cpu.achievable_flops_fraction,
            cpu.memory_headroom_bytes, cpu.memory_bandwidth_Bps, kind="cpu",
        )
        spec["devices_per_node"] = local
        return cls(nodes=world // local, name="detected-cpu", **spec)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Cluster":
        data = dict(data)
        data["device"] = Device(**data["device"])
        return cls(**data)
