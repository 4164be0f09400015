"""calibrate: formulas, a world of one in-process, and a 2-rank torchrun run writing a loadable cluster JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import autoplan
from autoplan.calibrate import layer_overhead_time_s, main, matmul_flops, ring_bandwidth_Bps
from distributed_helpers import REPO


@pytest.fixture
def one_thread():
    """Measure as a torchrun rank does (OMP_NUM_THREADS=1): two intra-op threads spinning on loaded shared cores
    make a tiny block's dispatch time meaningless."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ring_bandwidth_inverts_the_ring_allreduce_time():
    # 4 ranks, 1 GB at 10 GB/s per rank: 2·3/4·1e9 / 1e10 = 0.15 s, plus 1 ms latency.
    assert ring_bandwidth_Bps(10**9, ranks=4, time_s=0.151, latency_s=0.001) == pytest.approx(1e10)


def test_matmul_rate_is_positive_for_every_precision():
    assert all(matmul_flops(p, n=32, iters=1) > 0 for p in ("fp32", "bf16", "fp16"))


def test_layer_overhead_is_a_fixed_time_per_layer(one_thread):
    # A tiny block's forward + backward on CPU: tens of µs to a few ms per forward, nowhere near zero (far more
    # when other jobs load the cores: the bound only rules out nonsense).
    assert 1e-6 < layer_overhead_time_s(iters=3, repeats=3) < 0.5


def test_world_of_one_writes_a_cluster_the_planner_reads(tmp_path, one_thread):
    out = tmp_path / "cluster.json"
    assert main(["--out", str(out), "--matmul-n", "128"]) == 0
    cluster = autoplan.Cluster.from_dict(json.loads(out.read_text()))
    assert cluster.world_size == 1 and cluster.device.peak_flops["fp32"] > 1e6
    assert 0 < cluster.device.layer_overhead_s < 0.5 and cluster.compute_concurrency == 0


@pytest.mark.slow
def test_two_ranks_measure_the_intra_node_link(tmp_path):
    out = tmp_path / "cluster.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "autoplan.calibrate", "--out", str(out), "--size-mb", "1", "--matmul-n", "128"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cluster = autoplan.Cluster.from_dict(json.loads(out.read_text()))
    assert cluster.world_size == 2 and cluster.name == "calibrated-cpu"
    assert 1e6 < cluster.intra_node_bandwidth_Bps < 1e12 and 0 < cluster.intra_node_latency_s < 0.1
    assert 0 < cluster.device.layer_overhead_s < 0.5
    # the figures the cost model reads: collectives per kind and message size over the pair, matmul efficiency
    # per size (the best size is 1), the framework's per-layer and per-tensor overheads, the ranks' sharing
    points = cluster.collective_points("all_reduce", 2)
    assert len(points) >= 3 and all(t > 0 for _, t in points)
    assert [t for _, t in points] == sorted(t for _, t in points)
    assert {"all_gather", "reduce_scatter", "send", "broadcast", "ddp_all_reduce", "replicate_all_reduce",
            "fsdp_all_gather", "fsdp_reduce_scatter"} <= {kind for kind, _, _ in cluster.collective_times}
    table = dict(cluster.device.matmul_efficiency)["fp32"]
    assert len(table) >= 3 and max(e for _, e in table) == 1.0
    d = cluster.device
    assert min(d.tp_layer_overhead_s, d.fsdp_layer_overhead_s, d.optimizer_tensor_overhead_s,
               d.dtensor_optimizer_tensor_overhead_s, d.pipeline_stage_overhead_s) >= 0
    assert 0 < d.optimizer_param_s < 1e-6  # seconds per parameter of AdamW as torch runs it
    assert 0 < d.recompute_overhead_s < 0.1  # the checkpoint's saved-tensor hooks on a tiny block
    assert 0 <= cluster.compute_concurrency <= 2
    # the DTensor and FSDP2 overheads per group size: a world of 2 has groups of 2 only
    assert {kind: [n for n, _ in pts] for kind, pts in d.group_layer_overhead} == {
        "fsdp": [2], "fsdp_keep": [2], "replicate": [2], "tp": [2]}
