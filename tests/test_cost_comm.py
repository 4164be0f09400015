"""Collectives under the alpha-beta model, against hand-worked numbers."""

import pytest

from autoplan.cluster import Cluster
from autoplan.cost import (
    allgather_s,
    allreduce_s,
    data_parallel_sync_s,
    group_allgather_s,
    group_allreduce_s,
    group_reduce_scatter_s,
    group_link,
    optimizer_step_bytes_per_param,
    optimizer_step_s,
    p2p_s,
    reduce_scatter_s,
)

LINK = dict(bandwidth_Bps=100e9, latency_s=10e-6)


def two_dgx_a100() -> Cluster:
    # 2 nodes × 8 GPUs; 300 GB/s NVLink (5 µs), 25 GB/s InfiniBand per GPU (10 µs).
    return Cluster.preset("a100-80gb", nodes=2)


def test_ring_allreduce():
    # 2·3/4 · 1 GB / 100 GB/s + 2·3 · 10 µs
    assert allreduce_s(1e9, 4, **LINK) == pytest.approx(0.015 + 60e-6)


def test_allgather_and_reduce_scatter():
    # 3/4 · 1 GB / 100 GB/s + 3 · 10 µs
    assert allgather_s(1e9, 4, **LINK) == pytest.approx(0.0075 + 30e-6)
    assert reduce_scatter_s(1e9, 4, **LINK) == pytest.approx(0.0075 + 30e-6)


def test_allreduce_is_reduce_scatter_plus_allgather():
    # Rabenseifner: a ring all-reduce is a reduce-scatter followed by an all-gather.
    for n in (2, 3, 8, 64):
        assert allreduce_s(3e8, n, **LINK) == pytest.approx(
            reduce_scatter_s(3e8, n, **LINK) + allgather_s(3e8, n, **LINK)
        )


def test_p2p():
    assert p2p_s(1e8, bandwidth_Bps=25e9, latency_s=10e-6) == pytest.approx(0.004 + 10e-6)


def test_group_of_one_costs_nothing():
    assert allreduce_s(1e9, 1, **LINK) == 0
    assert allgather_s(1e9, 1, **LINK) == 0
    assert reduce_scatter_s(1e9, 1, **LINK) == 0
    assert group_allreduce_s(1e9, two_dgx_a100(), 1, 8) == 0


@pytest.mark.parametrize(
    "group_size, stride, intra",
    [(8, 1, True), (4, 2, True), (2, 4, True), (1, 16, True), (16, 1, False), (2, 8, False), (3, 3, False)],
)
def test_group_link_intra_or_inter(group_size, stride, intra):
    c = two_dgx_a100()
    expected = (300e9, 5e-6) if intra else (25e9, 10e-6)
    assert group_link(c, group_size, stride) == expected


def test_group_allreduce_inside_a_node_is_a_ring_over_nvlink():
    c = two_dgx_a100()
    assert group_allreduce_s(1e9, c, 8, 1) == pytest.approx(2 * 7 / 8 * 1e9 / 300e9 + 14 * 5e-6)


def test_hierarchical_allreduce_whole_cluster():
    # 16 ranks, 8 per node: RS over 8 (NVLink) + AR of 1/8 over 2 nodes (IB) + AG over 8 (NVLink).
    c = two_dgx_a100()
    rs = 7 / 8 * 1.6e9 / 300e9 + 7 * 5e-6
    ar = 2 * 1 / 2 * 0.2e9 / 25e9 + 2 * 10e-6
    assert group_allreduce_s(1.6e9, c, 16, 1) == pytest.approx(rs + ar + rs)
    flat = allreduce_s(1.6e9, 16, bandwidth_Bps=25e9, latency_s=10e-6)
    assert group_allreduce_s(1.6e9, c, 16, 1) < flat / 5


def test_hierarchical_allreduce_with_stride():
    # 4 ranks 4 apart: ranks 0, 4 on node 0 and 8, 12 on node 1 → 2 per node, 2 nodes.
    c = two_dgx_a100()
    rs = 1 / 2 * 1e9 / 300e9 + 5e-6
    ar = 2 * 1 / 2 * 0.5e9 / 25e9 + 2 * 10e-6
    assert group_allreduce_s(1e9, c, 4, 4) == pytest.approx(rs + ar + rs)


def test_one_rank_per_node_is_a_flat_ring_over_the_nics():
    c = two_dgx_a100()
    assert group_allreduce_s(1e9, c, 2, 8) == pytest.approx(1e9 / 25e9 + 2 * 10e-6)


def test_two_level_allgather_and_reduce_scatter_across_nodes():
    # 16 ranks on 2 nodes: an all-gather of 0.2 GB between the 2 nodes on each NIC, then 1.6 GB over NVLink.
    c = two_dgx_a100()
    expected = (1 / 2 * 0.2e9 / 25e9 + 10e-6) + (7 / 8 * 1.6e9 / 300e9 + 7 * 5e-6)
    assert group_allgather_s(1.6e9, c, 16, 1) == pytest.approx(expected)
    assert group_reduce_scatter_s(1.6e9, c, 16, 1) == pytest.approx(expected)
    # inside a node and with one member per node: plain rings
    assert group_allgather_s(1e9, c, 8, 1) == pytest.approx(allgather_s(1e9, 8, bandwidth_Bps=300e9, latency_s=5e-6))
    assert group_allgather_s(1e9, c, 2, 8) == pytest.approx(allgather_s(1e9, 2, bandwidth_Bps=25e9, latency_s=1e-5))
    assert group_reduce_scatter_s(1e9, c, 1, 8) == 0


def test_ddp_sync_is_one_gradient_allreduce_in_fp32():
    c = Cluster.preset("a100-80gb")
    got = data_parallel_sync_s(1_000_000_000, c, dp=8, stride=1, data_parallel="ddp", precision="bf16")
    assert got == pytest.approx(2 * 7 / 8 * 4e9 / 300e9 + 14 * 5e-6)
    fp32 = data_parallel_sync_s(1_000_000_000, c, dp=8, stride=1, data_parallel="ddp", precision="fp32")
    assert fp32 == pytest.approx(got)
    # ZeRO's accounting reduces bf16 gradients: half the bytes.
    bf16 = data_parallel_sync_s(1_000_000_000, c, dp=8, stride=1, data_parallel="ddp", precision="bf16",
                                grad_reduce_bytes=2)
    assert bf16 == pytest.approx(2 * 7 / 8 * 2e9 / 300e9 + 14 * 5e-6)


def test_fsdp_sync_gathers_weights_twice_and_scatters_gradients():
    # ZeRO §7: two all-gathers of weights (bf16 here) and one reduce-scatter of gradients (fp32).
    c = Cluster.preset("a100-80gb")
    fsdp = data_parallel_sync_s(1_000_000_000, c, dp=8, stride=1, data_parallel="fsdp", precision="bf16")
    assert fsdp == pytest.approx(2 * (7 / 8 * 2e9 / 300e9 + 7 * 5e-6) + (7 / 8 * 4e9 / 300e9 + 7 * 5e-6))
    # With equal element sizes it is 1.5× the DDP volume.
    zero_latency = Cluster(nodes=1, devices_per_node=8, device=c.device, intra_node_latency_s=0.0)
    ratio = (data_parallel_sync_s(10**9, zero_latency, dp=8, stride=1, data_parallel="fsdp", precision="fp32")
             / data_parallel_sync_s(10**9, zero_latency, dp=8, stride=1, data_parallel="ddp", precision="fp32"))
    assert ratio == pytest.approx(1.5)


def test_dp_across_nodes_uses_the_nics():
    c = two_dgx_a100()
    # dp = 2 with tp = 8 innermost: one rank per node, a flat ring over InfiniBand.
    got = data_parallel_sync_s(1_000_000_000, c, dp=2, stride=8, data_parallel="ddp", precision="fp32")
    assert got == pytest.approx(4e9 / 25e9 + 2 * 10e-6)
    assert data_parallel_sync_s(1_000_000_000, c, dp=1, stride=8, data_parallel="fsdp", precision="bf16") == 0
    # FSDP over all 16 ranks: each gather and scatter is two-level.
    fsdp = data_parallel_sync_s(1_000_000_000, c, dp=16, stride=1, data_parallel="fsdp", precision="fp32")
    assert fsdp == pytest.approx(3 * group_allgather_s(4e9, c, 16, 1))


def test_optimizer_step_is_memory_bound():
    c = Cluster.preset("h100-80gb")
    assert optimizer_step_bytes_per_param("bf16", "adamw") == 28
    assert optimizer_step_bytes_per_param("fp32", "adamw") == 28
    assert optimizer_step_bytes_per_param("fp32", "sgd") == 20
    assert optimizer_step_bytes_per_param("bf16", "sgd") == 20
    assert optimizer_step_s(10**9, c, "bf16", "adamw") == pytest.approx(28e9 / 3.35e12)
    assert optimizer_step_s(0, c, "bf16", "adamw") == 0


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: allreduce_s(1e9, 0, **LINK), "n must be a positive int"),
        (lambda: allgather_s(-1, 2, **LINK), "nbytes"),
        (lambda: p2p_s(1, bandwidth_Bps=0, latency_s=0), "bandwidth_Bps"),
        (lambda: reduce_scatter_s(1, 2, bandwidth_Bps=1e9, latency_s=-1), "latency_s"),
        (lambda: group_link(two_dgx_a100(), 32, 1), "world size 16"),
        (lambda: group_link(two_dgx_a100(), 2, 0), "stride"),
        (lambda: data_parallel_sync_s(10, two_dgx_a100(), dp=2, stride=1, data_parallel="zero",
                                      precision="bf16"), "data_parallel"),
        (lambda: optimizer_step_s(10, two_dgx_a100(), "bf16", "adam"), "optimizer"),
        (lambda: data_parallel_sync_s(10, two_dgx_a100(), dp=2, stride=1, data_parallel="ddp", precision="bf16",
                                      grad_reduce_bytes=0), "grad_reduce_bytes"),
    ],
)
def test_bad_arguments_name_the_cause(call, words):
    with pytest.raises(ValueError, match=words):
        call()
