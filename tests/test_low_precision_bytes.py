"""What a low precision keeps wide: the trace's autocast and bf16-weights passes (autoplan.trace.low_precision_bytes)
and the prices they feed (autoplan.cost.layer_choice.as_low_precision_runs). The executor's collectives under
autocast are counted against these prices on 4 gloo ranks in tests/test_collective_counts.py (the GPT's pp4 and
pp2×tp2 in bf16)."""

from __future__ import annotations

import pytest
import torch

import autoplan
from autoplan.cost.layer_choice import layer_choice_cost
from autoplan.cost.strategy import Strategy
from autoplan.models import GPT, MLP, GPTConfig
from autoplan.trace.low_precision_bytes import without_low_precision_bytes

CFG = GPTConfig(vocab_size=64, seq_len=8, hidden=32, layers=2, heads=4)


def _gpt_graph():
    return autoplan.trace(GPT(CFG), torch.randint(0, CFG.vocab_size, (4, CFG.seq_len)))


def test_the_stream_stays_fp32_and_a_linear_output_is_bf16():
    graph = _gpt_graph()
    block = graph.layer("blocks.0")
    assert block.autocast.output_bytes == block.output_bytes  # the residual stream: fp32 under autocast
    # saved for backward: more than half (the norms' inputs stay fp32), less than all (the linears' inputs are bf16)
    assert block.activation_bytes // 2 < block.autocast.activation_bytes < block.activation_bytes
    for group in block.tp_groups:  # the rowwise output halves; the pair's input (a norm's output) stays fp32
        assert (group.autocast.output_bytes, group.autocast.input_bytes) == (group.output_bytes // 2,
                                                                             group.input_bytes)
    head = graph.layer("head").tp_groups[0]
    assert (head.autocast.output_bytes, head.autocast.input_bytes) == (head.output_bytes // 2, head.input_bytes)
    tok = graph.layer("tok").tp_groups[0]
    assert tok.autocast.output_bytes == tok.output_bytes  # an embedding is no autocast op
    mlp = autoplan.trace(MLP(16, 32, depth=2), torch.randn(4, 16))
    assert [layer.autocast.output_bytes * 2 for layer in mlp.layers] == [layer.output_bytes for layer in mlp.layers]


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
    # each at its own run's saved bytes, of which tp = 2 leaves the same share
    tp_share = by_policy.activation_bytes / block.bf16_weights.activation_bytes
    assert abs(by_autocast.activation_bytes - block.autocast.activation_bytes * tp_share) <= 1
    assert 0.5 < tp_share < 1
    # each pair: its output all-reduced in bf16 forward, its input gradient in fp32 backward
    assert sorted(c.nbytes for c in by_autocast.tp_collectives) == [fp32_stream // 2] * 2 + [fp32_stream] * 2
    assert sorted(c.nbytes for c in by_policy.tp_collectives) == [fp32_stream // 2] * 4
    # a graph without the pass (hand-built, or a model autocast could not run) keeps the halving
    plain = without_low_precision_bytes([block])[0]
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


class UpcastRMSNorm(torch.nn.Module):
    """transformers' Llama RMSNorm: normalises in fp32 whatever its input, and saves that fp32 tensor."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden))

    def forward(self, x):
        wide = x.to(torch.float32)
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * wide.to(x.dtype)


class LlamaLikeBlock(torch.nn.Module):
    def __init__(self, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = UpcastRMSNorm(hidden), UpcastRMSNorm(hidden)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.gate, self.up = torch.nn.Linear(hidden, 64, bias=False), torch.nn.Linear(hidden, 64, bias=False)
        self.down = torch.nn.Linear(64, hidden, bias=False)

    def forward(self, x):
        b, t, h = x.shape
        y = self.norm1(x)
        q, k, v = (p(y).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        x = x + self.o(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                       .transpose(1, 2).reshape(b, t, h))
        y = self.norm2(x)
        return x + self.down(torch.nn.functional.silu(self.gate(y)) * self.up(y))


class LlamaLike(torch.nn.Module):
    def __init__(self, vocab: int = 64, hidden: int = 32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.blocks = torch.nn.ModuleList([LlamaLikeBlock(hidden), LlamaLikeBlock(hidden)])
        self.norm, self.head = UpcastRMSNorm(hidden), torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def saved_bytes_under_fsdp_bf16(model: torch.nn.Module, ids: torch.Tensor, units: list[str]) -> int:
    """Bytes autograd saves over one forward of ``model`` as the executor's FSDP2 runs a bf16 plan (its
    ``MixedPrecisionPolicy``, on a world of one, ``units`` sharded on their own), each storage once, the gathered
    weights not counted."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from autoplan.execute.data_parallel import apply_data_parallel
    from autoplan.trace.adapters import trace_kwargs

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = apply_data_parallel(model, "fsdp", init_device_mesh("cpu", (1,)), units, "bf16", composed=False)
        seen: dict[int, int] = {}

        def pack(t):
            weights = {p.untyped_storage().data_ptr() for p in model.parameters() if not hasattr(p, "device_mesh")}
            key = t.untyped_storage().data_ptr()
            if key not in weights:
                seen.setdefault(key, t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = wrapped(ids, **trace_kwargs(model, {}))  # as a step runs it: use_cache=False where taken
        logits = out if isinstance(out, torch.Tensor) else out.logits
        assert logits.dtype == torch.bfloat16  # the policy ran: bf16 compute
    finally:
        dist.destroy_process_group()
    return sum(seen.values())


def test_bf16_weights_save_what_fsdp2_mixed_precision_saves():
    """The bf16-weights pass reads what FSDP2's mixed precision saves, an RMSNorm's fp32 upcast included, where
    halving the fp32 bytes charged less."""
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (4, 16))
    graph = autoplan.trace(LlamaLike(), ids)
    predicted = sum(layer.bf16_weights.activation_bytes for layer in graph.layers)
    halved = sum(layer.activation_bytes for layer in graph.layers) // 2
    measured = saved_bytes_under_fsdp_bf16(LlamaLike(), ids, ["blocks.0", "blocks.1"])
    assert predicted == measured, (predicted, measured, halved)
    assert measured > 1.05 * halved  # the upcasts: what the halving missed
    # and a layout running bf16 weights is priced at them: FSDP over 2 ranks, one microbatch of the traced 4
    block, cluster = graph.layer("blocks.0"), autoplan.Cluster.preset("a100-80gb")
    fsdp = Strategy(1, 2, 1, 4, 1, "1f1b", "fsdp", precision="bf16")
    assert fsdp.mixed_precision == "fsdp"
    assert layer_choice_cost(graph, block, cluster, fsdp, False, None).activation_bytes == \
        block.bf16_weights.activation_bytes


def test_bf16_weights_of_a_transformers_llama_are_what_fsdp2_saves():
    """transformers' Llama (grouped key/value heads, RMSNorms that normalise in fp32): the pass reads, to the byte,
    what the executor's FSDP2 bf16 wrapper saves over a forward run as a step runs it."""
    pytest.importorskip("transformers", reason="the transformers case needs transformers")
    import models_hf

    model, inputs = models_hf.hf_llama()
    graph = autoplan.trace(model, inputs)
    predicted = sum(layer.bf16_weights.activation_bytes or 0 for layer in graph.layers)
    fresh, _ = models_hf.hf_llama()
    units = [layer.name for layer in graph.layers if layer.name.startswith("model.layers.")]
    assert predicted == saved_bytes_under_fsdp_bf16(fresh, inputs["input_ids"], units)
    assert predicted > 1.05 * sum(layer.activation_bytes for layer in graph.layers) // 2
