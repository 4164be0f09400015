"""Devices and clusters: the hardware figures the cost model reads.

Example:
    >>> import autoplan
    >>> cluster = autoplan.Cluster.preset("a100-80gb", nodes=2)
    >>> cluster.world_size, cluster.device.memory_bytes // 2**30
    (16, 80)
"""

from __future__ import annotations

import os
from dataclasses import MISSING, asdict, dataclass, fields

from .cluster_tables import _collective_table
from .device import MEASURED_SECONDS_FIELDS, Device, GiB

__all__ = ["Device", "Cluster", "PRESETS"]

# Vendor figures (dense, no sparsity), per GPU:
# - A100 SXM4: NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOP/s BF16/FP16 Tensor Core, 19.5 TFLOP/s FP32
#   (PyTorch keeps TF32 off for matmuls by default, so fp32 runs at the FP32 rate); HBM2 1,555 GB/s (40 GB),
#   HBM2e 2,039 GB/s (80 GB); NVLink 3: 600 GB/s total = 300 GB/s each way.
# - H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet: 989 TFLOP/s BF16/FP16 Tensor Core, 67 TFLOP/s FP32;
#   HBM3 3.35 TB/s; NVLink 4: 900 GB/s total = 450 GB/s each way.
# - H200 SXM: NVIDIA H200 datasheet: the H100's compute, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
# Inter-node: DGX A100 has one 200 Gb/s HDR InfiniBand ConnectX-6 per GPU (25 GB/s); DGX H100/H200 one 400 Gb/s
# NDR ConnectX-7 per GPU (50 GB/s) (DGX A100 / DGX H100 user guides).
# Latency (alpha): a few µs per NVLink step and ~10 µs per InfiniBand step, the order of NCCL's small-message
# all-reduce times (nccl-tests); only small messages feel them.
# Achievable fraction of peak, for matmuls alone (the cost model prices the elementwise ops around them
# separately, at memory bandwidth: autoplan.cost.memory_bound_s). The best bf16 matmul shapes reach 85.9% of
# peak on an A100 SXM and 80.1% on an H100 SXM (S. Bekman, "Machine Learning Engineering", Maximum Achievable
# Matmul FLOPS table, CUDA 12.1); a transformer's shapes fall below the best one (tile and wave quantisation), so
# 0.70 for the A100 and, in the same proportion, 0.65 for the H100. One figure per device, not per model: with it
# the Megatron-LM SC'21 Table 1 runs are predicted at 0.94–1.02× of their published iteration times
# (benchmarks/published_runs.py; 0.80 would give 0.87–0.89×). Whole-step MFU is lower (52% for GPT-3 175B in
# SC'21 Table 1; 38–43% for Llama 3 on H100, Dubey et al. 2024, Table 4) because it also pays communication,
# bubbles and the memory-bound ops. benchmarks/gpu_memory_check.py measures a large matmul's fraction on the
# machine at hand.
# Headroom: the CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation, ~2 GiB in practice.
# Layer overhead: an eager transformer block's forward launches ~10–20 kernels (two LayerNorms, four linears,
# attention, activation, residual adds, reshapes). A kernel launch costs a few µs of host time: NVIDIA's
# "Getting Started with CUDA Graphs" (A. Gray, NVIDIA developer blog, 2019) times a 2.9 µs kernel at 3.8 µs per
# launch back to back and 9.6 µs when each launch is synchronised; PyTorch's eager dispatch adds its own µs per
# op on the host. ~15 launches × ~3–5 µs ≈ 50 µs per block forward. Launches are asynchronous, so with long
# kernels this hides behind the GPU's work: added to the compute time it is an upper bound that only matters
# for small layers or many small microbatches.
_GPU_LAYER_OVERHEAD_S = 50e-6
_A100_FLOPS = {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12}
_H100_FLOPS = {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12}
_A100_MATMUL_FRACTION = 0.70
_H100_MATMUL_FRACTION = 0.65


def _cpu_device() -> Device:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 16 * GiB
    # A gloo rank on a laptop-class core: ~50 GFLOP/s fp32 sgemm, no fast low precision.
    # Layer overhead measured on a 2-core x86 CI machine (torch 2.13 CPU, one thread): forward + backward of a
    # GPT block at hidden 8, 4 tokens, batch 1 (FLOPs negligible) takes ~610 µs, i.e. ~200 µs per forward-
    # equivalent (forward 1×, backward 2×); autoplan.calibrate.layer_overhead_time_s measures it anywhere.
    return Device(
        name="cpu",
        memory_bytes=int(total),
        peak_flops={"fp32": 100e9, "bf16": 100e9, "fp16": 100e9},
        achievable_flops_fraction=0.5,
        memory_headroom_bytes=300 * 2**20,  # one python + torch process
        memory_bandwidth_Bps=10e9,
        kind="cpu",
        layer_overhead_s=200e-6,
    )


def _dgx_node(device: Device, *, nvlink_Bps: float, infiniband_Bps: float) -> dict:
    """A DGX-style node: 8 GPUs on NVLink/NVSwitch, one InfiniBand NIC per GPU between nodes."""
    return dict(
        device=device,
        devices_per_node=8,
        intra_node_bandwidth_Bps=nvlink_Bps,
        inter_node_bandwidth_Bps=infiniband_Bps,
        intra_node_latency_s=5e-6,
        inter_node_latency_s=10e-6,
    )


PRESETS: dict[str, dict] = {
    "a100-40gb": _dgx_node(
        Device("A100-SXM4-40GB", 40 * GiB, _A100_FLOPS, _A100_MATMUL_FRACTION, 2 * GiB, 1.555e12,
               layer_overhead_s=_GPU_LAYER_OVERHEAD_S),
        nvlink_Bps=300e9, infiniband_Bps=25e9,
    ),
    "a100-80gb": _dgx_node(
        Device("A100-SXM4-80GB", 80 * GiB, _A100_FLOPS, _A100_MATMUL_FRACTION, 2 * GiB, 2.039e12,
               layer_overhead_s=_GPU_LAYER_OVERHEAD_S),
        nvlink_Bps=300e9, infiniband_Bps=25e9,
    ),
    "h100-80gb": _dgx_node(
        Device("H100-SXM5-80GB", 80 * GiB, _H100_FLOPS, _H100_MATMUL_FRACTION, 2 * GiB, 3.35e12,
               layer_overhead_s=_GPU_LAYER_OVERHEAD_S),
        nvlink_Bps=450e9, infiniband_Bps=50e9,
    ),
    "h200-141gb": _dgx_node(
        Device("H200-SXM-141GB", 141 * 10**9, _H100_FLOPS, _H100_MATMUL_FRACTION, 2 * GiB, 4.8e12,
               layer_overhead_s=_GPU_LAYER_OVERHEAD_S),
        nvlink_Bps=450e9, infiniband_Bps=50e9,
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


def _preset_for_gpu(name: str, total_memory_bytes: int) -> str | None:
    """The preset whose figures describe a CUDA device called ``name``; ``None`` when none does."""
    upper = name.upper()
    if "H200" in upper:
        return "h200-141gb"
    if "H100" in upper:
        return "h100-80gb"
    if "A100" in upper:
        return "a100-40gb" if total_memory_bytes < 60 * GiB else "a100-80gb"
    return None


@dataclass(frozen=True)
class Cluster:
    """``nodes`` × ``devices_per_node`` identical devices.

    Bandwidths are per device and per direction in bytes/s; latencies are the alpha term of one message.

    Measured figures (``autoplan.calibrate`` writes them; empty/0 for the presets, which use the formulas):

    - ``collective_times``: per collective kind (``"all_reduce"``, ``"all_gather"``, ``"reduce_scatter"``,
      ``"send"``, ``"broadcast"``) and group size, measured ``(bytes, seconds)`` points of one collective inside a node, all
      groups of that size busy at once. The cost model interpolates them linearly in bytes (beyond the largest,
      along the last segment) in place of the alpha-beta formula for intra-node groups of a measured size.
    - ``compute_concurrency``: how many ranks compute at full speed at once when ranks share processors (a CPU
      job with more ranks than cores): rate of all ranks busy × ranks / rate of one rank alone. 0 means every
      rank has its own device. The device's rates are then one rank's alone, and the cost model slows a
      layout's compute by the ranks busy at once over this (:func:`autoplan.cost.compute_contention`).

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
    # ((kind, group_size, ((bytes, seconds), ...)), ...) measured by autoplan.calibrate; see the docstring
    collective_times: tuple[tuple[str, int, tuple[tuple[float, float], ...]], ...] = ()
    compute_concurrency: float = 0.0

    def __post_init__(self) -> None:
        for attr in ("nodes", "devices_per_node"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Cluster.{attr} must be a positive int, got {value!r}")
        if not isinstance(self.device, Device):
            raise ValueError(f"Cluster.device must be an autoplan.Device, got {type(self.device).__name__}")
        for attr in ("intra_node_bandwidth_Bps", "inter_node_bandwidth_Bps"):
            if not getattr(self, attr) > 0:
                raise ValueError(f"Cluster.{attr} must be positive, got {getattr(self, attr)}")
        for attr in ("intra_node_latency_s", "inter_node_latency_s", "compute_concurrency"):
            if not getattr(self, attr) >= 0:
                raise ValueError(f"Cluster.{attr} must be ≥ 0, got {getattr(self, attr)}")
        object.__setattr__(self, "collective_times", _collective_table(self.collective_times))

    def collective_points(self, kind: str, group_size: int) -> tuple[tuple[float, float], ...]:
        """The measured ``(bytes, seconds)`` points of ``kind`` over ``group_size`` ranks, or ``()``.

        Example:
            >>> c = Cluster.preset("cpu", devices_per_node=2)
            >>> c.collective_points("all_reduce", 2)
            ()
        """
        for k, n, points in self.collective_times:
            if k == kind and n == group_size:
                return points
        return ()

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @classmethod
    def preset(cls, name: str, nodes: int = 1, devices_per_node: int | None = None) -> "Cluster":
        """A cluster of ``nodes`` nodes of a named kind: "a100-40gb", "a100-80gb", "h100-80gb", "h200-141gb"
        or "cpu".

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

        Outside torchrun it describes a world of one on this machine. A GPU with no matching preset gets the
        A100-80GB preset's rates with its own name and memory (the cluster's name says so).

        Example:
            >>> Cluster.detect().world_size >= 1
            True
        """
        import torch

        world = _env_int("WORLD_SIZE", 1)
        local = _env_int("LOCAL_WORLD_SIZE", world)
        if world % local:
            raise ValueError(
                f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}; launch with torchrun "
                f"--nnodes N --nproc-per-node {local} so every node runs the same number of ranks"
            )
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            base = _preset_for_gpu(props.name, props.total_memory)
            name = f"detected-{base}" if base else f"detected-{props.name} (a100-80gb rates)"
            spec = dict(PRESETS[base or "a100-80gb"])
            device = spec.pop("device")
            spec["device"] = Device(
                props.name, props.total_memory, device.peak_flops, device.achievable_flops_fraction,
                device.memory_headroom_bytes, device.memory_bandwidth_Bps, layer_overhead_s=device.layer_overhead_s,
            )
            spec["devices_per_node"] = local
            return cls(nodes=world // local, name=name, **spec)
        spec = dict(PRESETS["cpu"])
        cpu = _cpu_device()
        spec["device"] = Device(
            "cpu", cpu.memory_bytes // local, cpu.peak_flops, cpu.achievable_flops_fraction,
            cpu.memory_headroom_bytes, cpu.memory_bandwidth_Bps, kind="cpu", layer_overhead_s=cpu.layer_overhead_s,
        )
        spec["devices_per_node"] = local
        return cls(nodes=world // local, name="detected-cpu", **spec)

    def to_dict(self) -> dict:
        """Plain JSON-able data; :meth:`from_dict` reads it back.

        A device's ``layer_overhead_s`` of 0 is left out, so a cluster without it writes the same JSON as before
        the field existed (plan JSON v1 stays as it was).

        Example:
            >>> c = Cluster.preset("a100-40gb", nodes=2)
            >>> Cluster.from_dict(c.to_dict()) == c
            True
        """
        data = asdict(self)
        for key in MEASURED_SECONDS_FIELDS:
            if data["device"][key] == 0:
                del data["device"][key]
        if self.device.matmul_efficiency:
            data["device"]["matmul_efficiency"] = {p: [list(x) for x in pts]
                                                   for p, pts in self.device.matmul_efficiency}
        else:
            del data["device"]["matmul_efficiency"]
        data["device"]["group_layer_overhead"] = {k: {str(n): s for n, s in pts}
                                                  for k, pts in self.device.group_layer_overhead}
        if not self.device.group_layer_overhead:
            del data["device"]["group_layer_overhead"]
        if self.collective_times:
            table: dict = {}
            for kind, n, points in self.collective_times:
                table.setdefault(kind, {})[str(n)] = [list(x) for x in points]
            data["collective_times"] = table
        else:
            del data["collective_times"]
        if self.compute_concurrency == 0:
            del data["compute_concurrency"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Cluster":
        """Rebuild a cluster from :meth:`to_dict` output; ``ValueError`` naming missing or unknown keys.

        Example:
            >>> Cluster.from_dict(Cluster.preset("h100-80gb").to_dict()).device.name
            'H100-SXM5-80GB'
        """
        if not isinstance(data, dict) or not isinstance(data.get("device"), dict):
            raise ValueError("a cluster dict needs a 'device' dict (write it with Cluster.to_dict())")
        _check_keys("Cluster", data, cls)
        _check_keys("Device", data["device"], Device)
        data = dict(data)
        data["device"] = Device(**data["device"])
        return cls(**data)


def _check_keys(what: str, data: dict, kind: type) -> None:
    known = {f.name for f in fields(kind)}
    required = {f.name for f in fields(kind) if f.default is MISSING and f.default_factory is MISSING}
    unknown = sorted(set(data) - known)
    missing = sorted(required - set(data))
    if unknown or missing:
        raise ValueError(f"{what} dict has unknown keys {unknown} and lacks required keys {missing}; "
                         f"expected keys are {sorted(known)}")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; torchrun sets it") from None
    if value < 1:
        raise ValueError(f"environment variable {name}={value} must be ≥ 1")
    return value
