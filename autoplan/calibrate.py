"""Measure this job's hardware and write a cluster JSON the planner can use instead of a preset.

Run under torchrun on the machines you will train on (one process per device)::

    torchrun --nproc_per_node 4 -m autoplan.calibrate --out cluster.json
    # multi-node: torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint HOST:29500 -m autoplan.calibrate ...

then ``autoplan.plan(model, inputs, cluster=autoplan.Cluster.from_dict(json.load(open("cluster.json"))))``.

What is measured, each figure the one the cost model reads (docs/cost_model.md, "Calibration"):

- ``compute_concurrency``: ranks that compute at full speed at once. A fixed amount of a tiny GPT block's forward +
  backward and of matmuls is timed on rank 0 alone (the others wait in a barrier) and on every rank at once, from
  a common barrier until the last rank is done; concurrency = ranks × time(alone) / time(all). When it is near the world size and the ranks have a core each, every rank has
  its own device and it is stored as 0; below (four gloo ranks on two cores) the device figures below are one rank's alone and the cost
  model stretches them by the ranks busy at once (:func:`autoplan.cost.compute_contention`).
- matmul FLOP/s per precision (``peak_flops``, rank 0 alone): the best rate over square ``n×n @ n×n`` matmuls
  (2n³ FLOPs each) of several sizes; ``matmul_efficiency`` keeps each size's rate as a fraction of it, which the
  cost model interpolates per matmul size (tensor parallelism's smaller matmuls run less efficiently).
- memory bandwidth (``memory_bandwidth_Bps``): a large copy, read + write (STREAM copy); what elementwise ops and
  the optimizer step run at.
- per-layer overheads: forward + backward of a GPT block so small (hidden 16, 4 tokens, batch 1) that its FLOPs
  take nanoseconds, so what is timed is the fixed part. Plain eager (``layer_overhead_s``, rank 0 alone); the
  same block tensor-parallel with DTensor, wrapped by FSDP2 ``fully_shard`` (resharding after forward, and keeping
  its weights between microbatches) and by FSDP2's ``replicate``, over groups of 2, 4, … ranks up
  to a node (``group_layer_overhead``, per group size; ``tp_layer_overhead_s`` / ``fsdp_layer_overhead_s`` keep
  the largest group's), each the extra time per forward-equivalent (backward runs about twice the forward's
  kernels: a third of forward + backward) once its collectives (priced at that group size from the table below)
  and the ranks' sharing are taken out.
- recompute's fixed time per recomputed layer and microbatch beyond the forward it runs again
  (``recompute_overhead_s``): the tiny block recomputed as the executor does (non-reentrant checkpoint) against
  plain, rank 0 alone.
- the optimizer's fixed time per parameter tensor (``optimizer_tensor_overhead_s``, and
  ``dtensor_optimizer_tensor_overhead_s`` for DTensor parameters: the FSDP2 block's) and its time per parameter
  (``optimizer_param_s``: ``torch.optim.AdamW`` over 32 tensors of 2¹⁶ parameters, less their fixed part), one
  rank alone.
- the pipeline runtime's fixed time per stage and microbatch (``pipeline_stage_overhead_s``): a 2-stage 1F1B
  pipeline of tiny blocks over pairs of ranks, less what the cost model prices for it without the figure.
- robustness: the concurrency's and the overheads' timings are medians of interleaved rounds (a burst of load
  from other jobs slows one sample of each figure, not every sample of one), with more rounds while they
  disagree; ``calibrate.last_spread`` reports each figure's spread.
- collectives (``collective_times``): all-reduce, all-gather, reduce-scatter, broadcast and send of several
  message sizes over groups of 2 consecutive ranks and of every rank of a node, all groups of a size at once, as
  (bytes, seconds) points; and the alpha-beta figures of the intra- and inter-node links from a 4-byte and a
  large all-reduce (a ring moves 2(n−1)/n·B per rank: nccl-tests' bus bandwidth, docs/PERFORMANCE.md there).
- the data-parallel wrappers' gradient sync as it runs in a step (``collective_times`` kinds "ddp_all_reduce" and
  "replicate_all_reduce"): a chain of linears of 1 MiB and ``--size-mb`` under ``DistributedDataParallel`` and
  under FSDP2's ``replicate``, every rank busy, less the chain without the sync; one FSDP2 unit's all-gather and
  reduce-scatter the same way ("fsdp_all_gather", "fsdp_reduce_scatter", per unit of a quarter of those sizes):
  a chain of 4 ``fully_shard`` units, resharding against keeping its weights, reducing against not.
- ``comm_overlap``: whether an all-reduce launched asynchronously runs while the rank computes (printed and
  returned by :func:`overlap_fraction`; it is 0 on ranks sharing cores, see docs/cost_model.md).

Example (a world of one measures the device only and keeps the preset's network figures):
    >>> from autoplan.calibrate import matmul_flops
    >>> matmul_flops("fp32", n=64, iters=2) > 0
    True
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace
from typing import Callable

import torch
import torch.distributed as dist

from .cluster import Cluster
from .execute.world import World
from .microbench import (COLLECTIVE_SIZES_BYTES, _timed, _tiny_block, allreduce_time_s, block_step_time_s,
                         collective_time_s, interleaved_medians, layer_overhead_time_s, matmul_efficiency,
                         matmul_flops, memory_bandwidth_Bps, monotone, optimizer_param_time_s,
                         optimizer_tensor_time_s, overlap_fraction, recompute_overhead_time_s, ring_bandwidth_Bps)
from .busy_bench import (busy_step_s, fsdp_collectives_in_step_s, group_mesh, group_of, makespan_s,
                         pipeline_stage_overhead_from_s, pipeline_stage_overhead_s, slowest, sync_in_step_s)
from .vocabulary import PRECISIONS

# The measurements themselves live in autoplan.microbench; they are re-exported here, where they are composed.
__all__ = ["main", "calibrate", "group_overheads_s", "pipeline_stage_overhead_from_s", "monotone", "matmul_flops",
           "matmul_efficiency", "memory_bandwidth_Bps", "interleaved_medians", "layer_overhead_time_s",
           "block_step_time_s", "optimizer_tensor_time_s", "optimizer_param_time_s", "allreduce_time_s",
           "collective_time_s", "ring_bandwidth_Bps", "overlap_fraction"]


def _alone(fn: Callable[[], float], device: torch.device) -> float:
    """``fn()`` timed on rank 0 while the other ranks wait in a barrier; its value on every rank."""
    t = torch.tensor([fn() if dist.get_rank() == 0 else 0.0], dtype=torch.float64, device=device)
    dist.barrier()
    dist.broadcast(t, src=0)
    return float(t)


def _link(num_bytes: int, ranks: list[list[int]], me: int, device: torch.device) -> tuple[float, float] | None:
    """(latency_s, bandwidth_Bps) over the group among ``ranks`` that holds ``me``; every rank calls this."""
    group, members = group_of(ranks, me)
    if len(members) < 2:
        return None
    latency = slowest(allreduce_time_s(4, group, device, iters=20), device)
    total = slowest(allreduce_time_s(num_bytes, group, device), device)
    return latency, ring_bandwidth_Bps(num_bytes, len(members), total, latency)


def _collective_table(local: int, sizes: list[int], device: torch.device) -> dict:
    """{kind: {n: [(bytes, seconds)]}} inside a node for n = 2 and n = ranks per node, all groups at once."""
    table: dict = {}
    for n in sorted({2, local}):
        if n < 2 or local % n:
            continue
        mesh = group_mesh(device, n)  # groups of n consecutive ranks, all at once
        group = mesh.get_group()
        for kind in ("all_reduce", "all_gather", "reduce_scatter", "broadcast") + (("send",) if n == 2 else ()):
            times = [slowest(collective_time_s(kind, b, group, device), device) for b in sizes]
            table.setdefault(kind, {})[str(n)] = list(zip(sizes, monotone(times)))
        ddp_sizes = sorted({min(2**20, sizes[-1]), sizes[-1]})
        for wrapper in ("ddp", "replicate"):
            times = monotone([sync_in_step_s(wrapper, b, mesh, device) for b in ddp_sizes])
            table.setdefault(f"{wrapper}_all_reduce", {})[str(n)] = list(zip(ddp_sizes, times))
        unit_sizes = [b // 4 for b in ddp_sizes]
        gathers, scatters = zip(*(fsdp_collectives_in_step_s(b, mesh, device) for b in unit_sizes))
        table.setdefault("fsdp_all_gather", {})[str(n)] = list(zip(unit_sizes, monotone(list(gathers))))
        table.setdefault("fsdp_reduce_scatter", {})[str(n)] = list(zip(unit_sizes, monotone(list(scatters))))
    return table


def _group_sizes(local: int) -> list[int]:
    """Group sizes the per-group figures are measured at: 2, 4, … up to the ranks of a node, each dividing it."""
    return [n for n in (2 ** k for k in range(1, local.bit_length())) if local % n == 0]


def _framework_overheads(device: torch.device, plain_s: float, contention: float, cluster: Cluster,
                         alone: Callable[[Callable[[], float]], float], rounds: int = 3,
                         window_s: float = 0.05) -> tuple[dict, float, dict[str, float]]:
    """Extra fixed seconds per forward of a tiny block made tensor-parallel with DTensor (the executor's
    ``ColwiseParallel`` → ``RowwiseParallel`` pairs), wrapped by FSDP2 ``fully_shard`` (resharding after forward,
    and keeping its weights with the gradient sync off: "fsdp_keep") and by ``replicate`` with the gradient sync
    off, at every group size
    n of :func:`_group_sizes` (the world cut into groups of n consecutive ranks, all groups at once, as the
    executor's meshes place them): the block's time with every rank busy, less its collectives priced at n from
    the cluster's table, divided by ``contention`` (the ranks' sharing; the block's time is the makespan of about
    ``window_s`` of calls, :func:`busy_step_s`), a third of it (forward 1×, backward 2×)
    less the plain block's ``plain_s``. The collectives' cost and the hooks' both depend on n (on ranks sharing
    cores a collective waits for every member to be scheduled), so one size's figure misprices the others.
    Every figure is the median of ``rounds`` interleaved samples (:func:`interleaved_medians`).

    Returns ({"tp": {n: s}, "fsdp": {n: s}, "fsdp_keep": {n: s}, "replicate": {n: s}}, the optimizer's seconds per
    DTensor parameter (the largest group's FSDP block, timed by ``alone``: one rank's figure, as the plain
    optimizer's; a rank's own median with every rank busy, divided by the contention, read it 2–4× low, 74–212
    µs against 360 µs alone), {figure: relative spread}). Collective."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from .cost.collectives import fsdp_unit_collective_s, group_allreduce_s

    world = dist.get_world_size()
    sizes = _group_sizes(cluster.devices_per_node if world > cluster.devices_per_node else world)
    measures, comm_s = {}, {}
    fsdp_block = None
    for n in sizes:
        mesh = group_mesh(device, n)
        tp_block, x = _tiny_block(device)
        out_bytes = x.numel() * 4
        parallelize_module(tp_block, mesh, {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(),
                                            "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel()})
        fsdp_block, _ = _tiny_block(device)
        param_bytes = sum(p.numel() for p in fsdp_block.parameters()) * 4
        fully_shard(fsdp_block, mesh=mesh, reshard_after_forward=True)
        # What the executor runs under several microbatches or a pipeline: units that keep their gathered weights
        # and accumulate unreduced gradients (no collective after the warm-up's gather), and replicate() roots with
        # the gradient sync off (their all-reduce is the data-parallel sync, priced apart).
        keep_block, _ = _tiny_block(device)
        fully_shard(keep_block, mesh=mesh, reshard_after_forward=False)
        keep_block.set_requires_gradient_sync(False)
        keep_block.set_reshard_after_backward(False)
        replicate_block, _ = _tiny_block(device)
        replicate(replicate_block, mesh=mesh)
        replicate_block.set_requires_gradient_sync(False)
        blocks = {"tp": tp_block, "fsdp": fsdp_block, "fsdp_keep": keep_block, "replicate": replicate_block}
        for kind, block in blocks.items():
            measures[f"{kind}{n}"] = busy_step_s(block, x, device, window_s)
        comm_s[f"tp{n}"] = 4 * group_allreduce_s(out_bytes, cluster, n, 1)  # forward g and backward f, two pairs
        comm_s[f"fsdp{n}"] = (2 * fsdp_unit_collective_s(cluster, "all_gather", param_bytes, n, 1)
                              + fsdp_unit_collective_s(cluster, "reduce_scatter", param_bytes, n, 1))
        comm_s[f"fsdp_keep{n}"] = comm_s[f"replicate{n}"] = 0.0
    totals, spread = interleaved_medians(measures, rounds=rounds)
    # zeros stand in for the gradients (no collective), so that one rank can time the step while the others wait
    dtensor_optimizer_s = alone(lambda: optimizer_tensor_time_s(fsdp_block, iters=9))
    return group_overheads_s(totals, comm_s, contention, plain_s), dtensor_optimizer_s, spread


def group_overheads_s(totals_s: dict[str, float], comm_s: dict[str, float], contention: float,
                      plain_s: float) -> dict[str, dict[int, float]]:
    """Per wrapper and group size, a layer's extra fixed forward seconds from a tiny block's measured forward +
    backward ``totals_s`` (keys ``"tp4"``, ``"fsdp2"``…: wrapper and group size, every rank busy): less the
    block's collectives ``comm_s`` (same keys), divided by ``contention``, a third of the rest (forward 1×,
    backward 2×) less the plain block's ``plain_s``, at least 0 — what
    :func:`autoplan.cost.layer_cost` adds to ``plain_s`` for a layer so wrapped, so that the cost model gives the
    tiny block back its measured time at every group size.

    Example (ranks sharing two cores four ways: contention 2):
        >>> group_overheads_s({"tp2": 0.030, "tp4": 0.036, "fsdp4": 0.015},
        ...                   {"tp2": 0.006, "tp4": 0.024, "fsdp4": 0.003}, contention=2.0, plain_s=0.001)
        {'tp': {2: 0.003, 4: 0.001}, 'fsdp': {4: 0.001}}
    """
    table: dict[str, dict[int, float]] = {}
    for key, total in totals_s.items():
        kind, n = key.rstrip("0123456789"), int(key[len(key.rstrip("0123456789")):])
        extra = (total - comm_s[key]) / contention / 3 - plain_s
        table.setdefault(kind, {})[n] = round(max(0.0, extra), 12)
    return table


def _concurrency(device: torch.device, ranks: int, rounds: int = 3,
                 window_s: float = 0.1) -> tuple[float, float, dict[str, float]]:
    """(ranks × rate with every rank busy / rate of rank 0 alone, the plain block's fixed forward seconds alone,
    spreads). Taken over a tiny block's forward + backward (the dispatch-bound work) and a 256² matmul (the
    compute-bound work), the mean of the two. Each is a fixed amount of work, about ``window_s`` of it alone, timed
    from a common barrier until the last rank is done: a rank's own time over a window shorter than the
    scheduler's slices (a few ms) is often a window it happened to run uncontended, which once read 2.7 ranks
    computing at once on a 2-core machine where four busy ranks each ran at exactly half speed. Each timing is the
    median of ``rounds`` interleaved samples (a load spike from other jobs during one "alone" sample would
    otherwise read as sharing or as independence), at most ``ranks``. It is not capped at the cores: under other
    jobs' load rank 0 alone gets less than a core too, and what the cost model needs is the ratio of the two rates
    as measured (the alone figures × ranks / concurrency = every rank busy). The block alone, a third of its
    forward + backward, is the plain layer overhead (:func:`layer_overhead_time_s`)."""
    block, x = _tiny_block(device)
    a = torch.randn(256, 256, device=device)
    per_call = {"block": (lambda: block_step_time_s(block, x, iters=10, repeats=3)),
                "matmul": (lambda: _timed(lambda: a @ a, device, 0.02))}
    plain_block_s = _alone(per_call["block"], device)
    calls = {"block": max(1, round(window_s / plain_block_s)),
             "matmul": max(1, round(window_s / _alone(per_call["matmul"], device)))}
    work = {"block": lambda: [block(x).sum().backward() for _ in range(calls["block"])],
            "matmul": lambda: [a @ a for _ in range(calls["matmul"])]}
    measures = {}
    for name, fn in work.items():
        measures[f"{name} alone"] = lambda fn=fn: makespan_s(fn, device, busy=False)
        measures[f"{name} together"] = lambda fn=fn: makespan_s(fn, device, busy=True)
    medians, spread = interleaved_medians(measures, rounds=rounds)
    measured = statistics.mean(ranks * medians[f"{name} alone"] / medians[f"{name} together"] for name in work)
    return min(float(ranks), measured), medians["block alone"] / calls["block"] / 3, spread


def _cores_per_rank_short(device: torch.device, ranks: int) -> bool:
    """Whether the CPU cores this process may run on cannot give each of ``ranks`` its threads: the ranks share
    processors whatever a loaded machine made the concurrency look like."""
    if device.type != "cpu" or not hasattr(os, "sched_getaffinity"):
        return False
    return len(os.sched_getaffinity(0)) / torch.get_num_threads() < 0.9 * ranks


def _overlap(device: torch.device, num_bytes: int) -> float:
    """:func:`overlap_fraction` of an asynchronous all-reduce of ``num_bytes`` over the world and matmuls run
    meanwhile (collective; the slowest rank's times)."""
    buf = torch.zeros(num_bytes // 4, device=device)
    a = torch.randn(256, 256, device=device)
    comm = slowest(collective_time_s("all_reduce", num_bytes, None, device, iters=3), device)
    reps = max(1, round(comm / _timed(lambda: a @ a, device, 0.02)))

    def compute():
        for _ in range(reps):
            a @ a

    compute_s = slowest(_timed(compute, device, 0, 3), device)

    def both():
        work = dist.all_reduce(buf, async_op=True)
        compute()
        work.wait()

    return overlap_fraction(comm, compute_s, slowest(_timed(both, device, 0, 3), device))


def calibrate(size_bytes: int, matmul_n: int, rounds: int = 3) -> Cluster:
    """Measure this job and return its :class:`Cluster` (collective: every rank calls it). The overlap
    measurement is left in ``calibrate.last_overlap`` (a float; ``None`` in a world of one), and how far the
    ``rounds`` interleaved samples of each figure of the concurrency and the per-layer overheads disagree in
    ``calibrate.last_spread`` ({figure: relative spread}, :func:`autoplan.microbench.relative_spread`; figures
    past 0.15 got up to two more rounds).

    Example: ``calibrate(2**24, 1024).to_dict()`` under torchrun.
    """
    cluster = Cluster.detect()
    world = World.current()
    device = world.device(cluster.device.kind)
    world.init_process_group(cluster.device.kind)
    ranks = world.size if world.distributed else 1
    calibrate.last_spread = {}
    concurrency, plain_s = float(ranks), None
    if world.distributed:
        concurrency, plain_s, calibrate.last_spread = _concurrency(device, ranks, rounds)
    # Near the world size: every rank has its own device (no sharing to model).
    shared = concurrency < 0.9 * ranks or _cores_per_rank_short(device, ranks)
    contention = max(1.0, ranks / concurrency) if shared else 1.0

    def alone(fn: Callable[[], float]) -> float:
        """One rank's figure: rank 0 alone when ranks share processors, else the slowest of all at once."""
        if not world.distributed:
            return fn()
        return _alone(fn, device) if shared else slowest(fn(), device)

    flops, efficiency = {}, {}
    for precision in PRECISIONS:
        box = {}

        def measure(precision=precision, box=box) -> float:
            box["best"], box["table"] = matmul_efficiency(precision, matmul_n, device)
            return 1 / box["best"]

        flops[precision] = 1 / alone(measure)
        if box and (not world.distributed or world.rank == 0 or not shared):
            efficiency[precision] = box["table"]
    if world.distributed:
        holder = [efficiency]
        dist.broadcast_object_list(holder, src=0)
        efficiency = holder[0]
    if plain_s is None or not shared:  # the concurrency's block alone is rank 0's figure, right when shared
        plain_s = alone(lambda: layer_overhead_time_s(device, iters=10, repeats=5))
    recompute_s = alone(lambda: recompute_overhead_time_s(device, iters=10, repeats=5))
    optimizer_s = alone(lambda: optimizer_tensor_time_s(_tiny_block(device)[0]))
    optimizer_param_s = alone(lambda: optimizer_param_time_s(optimizer_s, device))
    bandwidth_Bps = 1 / alone(lambda: 1 / memory_bandwidth_Bps(device, num_bytes=2**26, iters=3))
    device_fields = dict(peak_flops=flops, layer_overhead_s=plain_s, memory_bandwidth_Bps=bandwidth_Bps,
                         matmul_efficiency=efficiency, optimizer_tensor_overhead_s=optimizer_s,
                         optimizer_param_s=optimizer_param_s, recompute_overhead_s=recompute_s)
    changes: dict = {}
    calibrate.last_overlap = None
    if world.distributed:
        local, nodes = cluster.devices_per_node, cluster.nodes
        intra = _link(size_bytes, [list(range(n * local, (n + 1) * local)) for n in range(nodes)], world.rank, device)
        inter = _link(size_bytes, [list(range(i, nodes * local, local)) for i in range(local)], world.rank, device)
        if intra:
            changes.update(intra_node_latency_s=intra[0], intra_node_bandwidth_Bps=intra[1])
        if inter:
            changes.update(inter_node_latency_s=inter[0], inter_node_bandwidth_Bps=inter[1])
        sizes = sorted({b for b in COLLECTIVE_SIZES_BYTES if b < size_bytes} | {size_bytes})
        changes["collective_times"] = _collective_table(local, sizes, device)
        changes["compute_concurrency"] = concurrency if shared else 0.0
        measured = replace(cluster, **changes)
        table, dtensor_optimizer_s, spread = _framework_overheads(device, plain_s, contention, measured, alone,
                                                                  rounds)
        calibrate.last_spread.update(spread)
        # the size-free figures: the largest group's (what a reader of the older fields gets)
        device_fields["pipeline_stage_overhead_s"], pipeline_spread = pipeline_stage_overhead_s(
            device, plain_s, measured, rounds)
        calibrate.last_spread.update(pipeline_spread)
        device_fields.update(tp_layer_overhead_s=table["tp"][max(table["tp"])],
                             fsdp_layer_overhead_s=table["fsdp"][max(table["fsdp"])],
                             group_layer_overhead=table, dtensor_optimizer_tensor_overhead_s=dtensor_optimizer_s)
        calibrate.last_overlap = _overlap(device, size_bytes)
    changes["device"] = replace(cluster.device, **device_fields)
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
              + f"; layer overhead {d.layer_overhead_s * 1e6:.0f} µs (+{d.tp_layer_overhead_s * 1e6:.0f} µs "
              f"tensor-parallel, +{d.fsdp_layer_overhead_s * 1e6:.0f} µs FSDP)"
              + f"; compute concurrency {cluster.compute_concurrency:.2f} (0: a device per rank)"
              + (f"; all-reduce/compute overlap {calibrate.last_overlap:.2f}" if calibrate.last_overlap is not None
                 else "")
              + f"; intra-node {cluster.intra_node_bandwidth_Bps / 1e9:.2f} GB/s, "
              f"{cluster.intra_node_latency_s * 1e6:.0f} µs; wrote {args.out}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
