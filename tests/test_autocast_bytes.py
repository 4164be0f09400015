"""What autocast keeps wide: the trace's autocast pass (autoplan.trace.autocast_bytes) and the prices it feeds
(autoplan.cost.layer_choice.as_autocast_runs). The executor's collectives under autocast are counted against
these prices on 4 gloo ranks in tests/test_collective_counts.py (the GPT's pp4 and pp2×tp2 in bf16)."""

from __future__ import annotations

import torch

import autoplan
from autoplan.cost.layer_choice import layer_choice_cost
from autoplan.cost.strategy import Strategy
from autoplan.models import GPT, MLP, GPTConfig
from autoplan.trace.autocast_bytes import without_autocast_bytes

CFG = GPTConfig(vocab_size=64, seq_len=8, hidden=32, layers=2, heads=4)


def _gpt_graph():
    return autoplan.trace(GPT(CFG), torch.randint(0, CFG.vocab_size, (4, CFG.seq_len)))


def test_the_stream_stays_fp32_and_a_linear_output_is_bf16():
    graph = _gpt_graph()
    block = graph.layer("blocks.0")
    assert block.autocast_output_bytes == block.output_bytes  # the residual stream: fp32 under autocast
    # saved for backward: more than half (the norms' inputs stay fp32), less than all (the linears' inputs are bf16)
    assert block.activation_bytes // 2 < block.autocast_activation_bytes < block.activation_bytes
    for group in block.tp_groups:  # the rowwise output halves; the pair's input (a norm's output) stays fp32
        assert (group.autocast_output_bytes, group.autocast_input_bytes) == (group.output_bytes // 2,
                                                                             group.input_bytes)
    head = graph.layer("head").tp_groups[0]
    assert (head.autocast_output_bytes, head.autocast_input_bytes) == (head.output_bytes // 2, head.input_bytes)
    tok = graph.layer("tok").tp_groups[0]
    assert tok.autocast_output_bytes == tok.output_bytes  # an embedding is no autocast op
    mlp = autoplan.trace(MLP(16, 32, depth=2), torch.randn(4, 16))
    assert [layer.autocast_output_bytes * 2 for layer in mlp.layers] == [layer.output_bytes for layer in mlp.layers]


def test_autocast_layouts_price_what_autocast_sends_and_the_others_halve():
    graph = _gpt_graph()
    block, cluster = graph.layer("blocks.0"), autoplan.Cluster.preset("a100-80gb")
    autocast = Strategy(2, 1, 2, 4, 1, "1f1b", "ddp", precision="bf16")  # no data parallelism: autocast
    policy = Strategy(2, 2, 2, 4, 1, "1f1b", "ddp", precision="bf16")  # replicate's bf16 weights
    assert (autocast.mixed_precision, policy.mixed_precision) == ("autocast", "replicate")
    by_autocast = layer_choice_cost(graph, block, cluster, autocast, True, None)
    by_policy = layer_choice_cost(graph, block, cluster, policy, True, None)
    fp32_stream = block.output_bytes  # 4 samples traced, microbatch of 4, 4 bytes an element
    assert (by_autocast.boundary_bytes, by_policy.boundary_bytes) == (fp32_stream, fp32_stream // 2)
    tp_share = by_policy.activation_bytes / (block.activation_bytes // 2)  # what tp = 2 leaves of the halved bytes
    assert by_autocast.activation_bytes == round(block.autocast_activation_bytes * tp_share)
    # each pair: its output all-reduced in bf16 forward, its input gradient in fp32 backward
    assert sorted(c.nbytes for c in by_autocast.tp_collectives) == [fp32_stream // 2] * 2 + [fp32_stream] * 2
    assert sorted(c.nbytes for c in by_policy.tp_collectives) == [fp32_stream // 2] * 4
    # a graph without the pass (hand-built, or a model autocast could not run) keeps the halving
    plain = without_autocast_bytes([block])[0]
    graph.layers[block.index] = plain
    assert layer_choice_cost(graph, plain, cluster, autocast, True, None).boundary_bytes == fp32_stream // 2


def test_the_solvers_cost_cache_keeps_autocast_and_bf16_weights_apart():
    """One cache serves every strategy of a search: two that differ only in how bf16 runs share no cost."""
    from autoplan.solve.space import LayerChoice
    from autoplan.solve.tables import LayerCostCache, _signature

    graph = _gpt_graph()
    block, cluster = graph.layer("blocks.0"), autoplan.Cluster.preset("a100-80gb")
    cache = LayerCostCache(graph, cluster)
    choice = LayerChoice(tp_on=True, recompute=None)
    autocast = Strategy(2, 1, 2, 4, 1, "1f1b", "ddp", precision="bf16")
    policy = Strategy(2, 2, 2, 4, 1, "1f1b", "ddp", precision="bf16")
    got = [cache.get(block, _signature(block), s, choice).boundary_bytes for s in (autocast, policy, autocast)]
    assert got == [block.output_bytes, block.output_bytes // 2, block.output_bytes]
