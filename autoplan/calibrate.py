"""Measure this job's hardware and write a cluster JSON the planner can use instead of a preset.

Run under torchrun on the machines you will train on (one process per device)::

    torchrun --nproc_per_node 4 -m autoplan.calibrate --out cluster.json
    # multi-node: torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 -m autoplan.calibrate ...

then ``autoplan.plan(model, inputs, cluster=autoplan.Cluster.from_dict(json.load(open("cluster.json"))))``.

What is measured (every rank at once, the slowest rank's time kept):
- matmul FLOP/s per precision: a square ``n×n @ n×n`` matmul costs 2n³ FLOPs; the rate is written as the device's
  ``peak_flops`` (the planner still applies ``achievable_flops_fraction`` for whole-model efficiency).
- memory bandwidth (``memory_bandwidth_Bps``): a large copy, read + write (STREAM copy); what elementwise ops and
  the optimizer step run at.
- per-layer overhead (``layer_overhead_s``): forward + backward of a GPT block so small (hidden 8, 4 tokens,
  batch 1) that its FLOPs take nanoseconds, so what is timed is the fixed part — kernel launches, Python and
  autograd dispatch. Backward runs about twice the forward's kernels, so the cost model charges forward 1×,
  backward 2×, and the fixed forward part is a third of the measured time.
- all-reduce latency (a 4-byte all-reduce) and bandwidth: a ring all-reduce of B bytes over n ranks moves
  2(n−1)/n·B per rank (the "bus bandwidth" of nccl-tests, docs/PERFORMANCE.md there), so
  ``bandwidth = 2(n−1)/n·B / (t − latency)``. Intra-node over each node's ranks, inter-node over one rank per node.

Example (a world of one measures FLOP/s only and keeps the preset's network figures):
    >>> from autoplan.calibrate import matmul_flops
    >>> matmul_flops("fp32", n=64, iters=2) > 0
    True
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from .cluster import Cluster
from .execute.world import World
from .vocabulary import PRECISIONS, torch_dtype

__all__ = ["main", "matmul_flops", "memory_bandwidth_Bps", "layer_overhead_time_s", "allreduce_time_s",
           "ring_bandwidth_Bps"]



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(precision: str, n: int = 1024, iters: int = 10, device: torch.device | None = None) -> float:
    """FLOP/s of an ``n×n`` matmul at ``precision`` on ``device`` (2n³ FLOPs each, after one warm-up).

    Example:
        >>> matmul_flops("bf16", n=32, iters=1) > 0
        True
    """
    device = device or torch.device("cpu")
    a = torch.randn(n, n, device=device, dtype=torch_dtype(precision))
    b = torch.randn(n, n, device=device, dtype=torch_dtype(precision))
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start)


def layer_overhead_time_s(device: torch.device | None = None, iters: int = 20, repeats: int = 5) -> float:
    """Fixed forward seconds of one layer per microbatch on ``device``: a third of a tiny GPT block's forward +
    backward (forward 1×, backward 2×; its FLOPs are negligible), the median of ``repeats`` runs of ``iters``.

    Example:
        >>> 0 < layer_overhead_time_s(iters=2, repeats=1) < 0.1
        True
    """
    from .models import Block, GPTConfig

    device = device or torch.device("cpu")
    block = Block(GPTConfig(hidden=8, heads=1, seq_len=4)).to(device)
    x = torch.randn(1, 4, 8, device=device, requires_grad=True)
    block(x).sum().backward()  # warm-up: first-call allocations and dispatch caches
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            block(x).sum().backward()
        _sync(device)
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times) / 3


def memory_bandwidth_Bps(device: torch.device | None = None, num_bytes: int = 2**27, iters: int = 5) -> float:
    """Bytes per second a copy of ``num_bytes`` moves through ``device`` memory: it reads and writes each byte,
    2·num_bytes per copy (the STREAM "copy" kernel's accounting, McCalpin 1995). The cost model prices
    elementwise ops at this rate (``autoplan.cost.memory_bound_s``).

    Example:
        >>> memory_bandwidth_Bps(num_bytes=2**20, iters=2) > 1e8
        True
    """
    device = device or torch.device("cpu")
    src = torch.ones(max(1, num_bytes // 4), device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first-touch page faults
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    return 2 * src.numel() * 4 * iters / (time.perf_counter() - start)


def allreduce_time_s(num_bytes: int, group: dist.ProcessGroup | None, device: torch.device, iters: int = 5) -> float:
    """Mean seconds of one all-reduce of ``num_bytes`` over ``group`` (after one warm-up); collective.

    Example (under torchrun): ``allreduce_time_s(2**24, None, torch.device("cpu"))``
    """
    tensor = torch.zeros(max(1, num_bytes // 4), device=device)
    dist.all_reduce(tensor, group=group)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(tensor, group=group)
    _sync(device)
    return (time.perf_counter() - start) / iters


def ring_bandwidth_Bps(num_bytes: int, ranks: int, time_s: float, latency_s: float) -> float:
    """Per-rank bandwidth from a timed ring all-reduce: 2(n−1)/n·bytes / (time − latency).

    Example:
        >>> ring_bandwidth_Bps(10**9, ranks=2, time_s=1.01, latency_s=0.01)
        1000000000.0
    """
    return 2 * (ranks - 1) / ranks * num_bytes / max(time_s - latency_s, 1e-9)


def _slowest(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _link(num_bytes: int, ranks: list[list[int]], me: int, device: torch.device) -> tuple[float, float] | None:
    """(latency_s, bandwidth_Bps) over the group among ``ranks`` that holds ``me``; every rank calls this."""
    groups = [dist.new_group(r) for r in ranks]  # new_group is collective: all ranks create every group
    mine = next((g, r) for g, r in zip(groups, ranks) if me in r)
    group, members = mine
    if len(members) < 2:
        return None
    latency = _slowest(allreduce_time_s(4, group, device, iters=20), device)
    total = _slowest(allreduce_time_s(num_bytes, group, device), device)
    return latency, ring_bandwidth_Bps(num_bytes, len(members), total, latency)


def calibrate(size_bytes: int, matmul_n: int) -> Cluster:
    """Measure this job and return its :class:`Cluster` (collective: every rank calls it).

    Example: ``calibrate(2**24, 1024).to_dict()`` under torchrun.
    """
    cluster = Cluster.detect()
    world = World.current()
    device = world.device(cluster.device.kind)
    world.init_process_group(cluster.device.kind)
    flops = {}
    for precision in PRECISIONS:
        rate = matmul_flops(precision, n=matmul_n, device=device)
        flops[precision] = _slowest(1 / rate, device) ** -1 if world.distributed else rate
    overhead_s = layer_overhead_time_s(device)
    bandwidth_Bps = memory_bandwidth_Bps(device)
    if world.distributed:
        overhead_s = _slowest(overhead_s, device)
        bandwidth_Bps = _slowest(1 / bandwidth_Bps, device) ** -1
    changes = {"device": replace(cluster.device, peak_flops=flops, layer_overhead_s=overhead_s,
                                 memory_bandwidth_Bps=bandwidth_Bps)}
    if world.distributed:
        local, nodes = cluster.devices_per_node, cluster.nodes
        intra = _link(size_bytes, [list(range(n * local, (n + 1) * local)) for n in range(nodes)], world.rank, device)
        inter = _link(size_bytes, [list(range(i, nodes * local, local)) for i in range(local)], world.rank, device)
        if intra:
            changes.update(intra_node_latency_s=intra[0], intra_node_bandwidth_Bps=intra[1])
        if inter:
            changes.update(inter_node_latency_s=inter[0], inter_node_bandwidth_Bps=inter[1])
    return replace(cluster, name=f"calibrated-{cluster.device.kind}", **changes)


def main(argv: list[str] | None = None) -> int:
    """``python -m autoplan.calibrate [--out cluster.json] [--size-mb 16] [--matmul-n N]`` (under torchrun).

    Example: ``torchrun --nproc_per_node 4 -m autoplan.calibrate --out cluster.json``
    """
    parser = argparse.ArgumentParser(prog="autoplan calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="cluster.json", help="where rank 0 writes the cluster JSON")
    parser.add_argument("--size-mb", type=float, default=16.0, help="all-reduce size for the bandwidth, MiB")
    parser.add_argument("--matmul-n", type=int, default=None, help="matmul size (default 1024 CPU, 8192 GPU)")
    args = parser.parse_args(argv)
    if args.size_mb <= 0:
        parser.error(f"--size-mb must be positive, got {args.size_mb}")
    n = args.matmul_n or (8192 if torch.cuda.is_available() else 1024)
    cluster = calibrate(int(args.size_mb * 2**20), n)
    world = World.current()
    if world.rank == 0:
        with open(args.out, "w") as f:
            json.dump(cluster.to_dict(), f, indent=2)
        d = cluster.device
        print(f"autoplan calibrate: {cluster.nodes}×{cluster.devices_per_node} {d.name}; matmul "
              + ", ".join(f"{p} {d.peak_flops[p] / 1e9:.1f} GFLOP/s" for p in PRECISIONS)
              + f"; memory {d.memory_bandwidth_Bps / 1e9:.1f} GB/s"
              + f"; layer overhead {d.layer_overhead_s * 1e6:.0f} µs"
              + f"; intra-node {cluster.intra_node_bandwidth_Bps / 1e9:.2f} GB/s, "
              f"{cluster.intra_node_latency_s * 1e6:.0f} µs; wrote {args.out}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
