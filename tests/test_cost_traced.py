"""layer_cost on a traced GPT: the linear batch scaling it relies on, and TP sharding of real layers."""

from functools import lru_cache

import pytest
import torch

import autoplan
from autoplan.cluster import Cluster
from autoplan.cost import layer_cost
from autoplan.models import GPT, GPTConfig, gpt_forward_flops

CFG = GPTConfig(vocab_size=256, seq_len=32, hidden=64, layers=2, heads=4)
CLUSTER = Cluster.preset("a100-80gb")


@lru_cache(maxsize=None)
def traced(batch: int):
    with torch.device("meta"):
        return autoplan.trace(GPT(CFG), torch.randint(0, CFG.vocab_size, (batch, CFG.seq_len), device="meta"))


def costs(graph, microbatch_size: int, tp: int = 1, precision: str = "fp32"):
    return [layer_cost(layer, traced_batch_size=graph.batch_size, traced_dtype_bytes=graph.dtype_bytes,
                       cluster=CLUSTER, tp=tp, microbatch_size=microbatch_size, precision=precision)
            for layer in graph.layers]


def test_scaling_a_batch_of_one_matches_tracing_the_batch():
    from_one, from_four = costs(traced(1), 4), costs(traced(4), 4)
    # The position ids (seq_len int64s) do not grow with the batch; scaling a batch of one counts them 4×.
    batch_free_bytes = 3 * CFG.seq_len * 8
    # The memory-bound time of the non-matmul ops reads the saved bytes, so it sees those bytes too.
    from autoplan.cost import BACKWARD_PASSES, FORWARD_PASSES, memory_bound_s
    for a, b in zip(from_one, from_four):
        assert abs(a.forward_s - b.forward_s) <= memory_bound_s(FORWARD_PASSES * batch_free_bytes, CLUSTER) * 1.001
        assert abs(a.backward_s - b.backward_s) <= memory_bound_s(BACKWARD_PASSES * batch_free_bytes, CLUSTER) * 1.001
        assert abs(a.activation_bytes - b.activation_bytes) <= batch_free_bytes
        assert abs(a.boundary_bytes - b.boundary_bytes) <= batch_free_bytes


def test_forward_time_is_the_closed_form_flops_at_the_achievable_rate():
    graph = traced(2)
    # Less the fixed per-layer overhead and the memory-bound time of the non-matmul ops (2 passes over the saved
    # bytes), which the closed form does not count.
    from autoplan.cost import FORWARD_PASSES, memory_bound_s
    total_s = sum(c.forward_s - memory_bound_s(FORWARD_PASSES * c.activation_bytes, CLUSTER)
                  for c in costs(graph, 2)) - len(graph.layers) * CLUSTER.device.layer_overhead_s
    expected_s = gpt_forward_flops(CFG, batch=2) / CLUSTER.device.achievable_flops("fp32")
    assert total_s == pytest.approx(expected_s, rel=0.05)


def test_tensor_parallel_shrinks_blocks_and_keeps_the_parameter_total():
    graph = traced(2)
    assert sum(c.num_params for c in costs(graph, 2)) == graph.num_params
    one, two = costs(graph, 2), costs(graph, 2, tp=2)
    for layer, a, b in zip(graph.layers, one, two):
        if layer.name.startswith("blocks."):
            assert b.num_params < 0.6 * a.num_params
            assert b.activation_bytes < a.activation_bytes
            assert b.tp_comm_s > 0
            assert b.boundary_bytes == a.boundary_bytes
