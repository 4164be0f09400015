"""The layer chain of a traced model: names, kinds, boundary bytes, tensor-parallel groups, recompute options."""

from __future__ import annotations

import torch

import autoplan
from autoplan.models import GPT, MLP, GPTConfig
from distributed_helpers import with_post_norm

CFG = GPTConfig(vocab_size=512, seq_len=32, hidden=64, layers=3, heads=4)
BATCH = 2


def _gpt_graph():
    return autoplan.trace(GPT(CFG), torch.randint(0, CFG.vocab_size, (BATCH, CFG.seq_len)))


def test_gpt_layer_chain_names_and_kinds():
    graph = _gpt_graph()
    assert [layer.name for layer in graph.layers] == ["tok", "pos", "blocks.0", "blocks.1", "blocks.2", "ln_f", "head"]
    assert [layer.index for layer in graph.layers] == list(range(7))
    kinds = [layer.kind for layer in graph.layers]
    assert kinds[2] == kinds[3] == kinds[4]
    assert len({kinds[0], kinds[1], kinds[2], kinds[5], kinds[6]}) == 5
    names = dict(GPT(CFG).named_modules())
    assert all(layer.name in names for layer in graph.layers)


def test_gpt_boundary_bytes():
    graph = _gpt_graph()
    hidden_bytes = BATCH * CFG.seq_len * CFG.hidden * 4
    for name in ("pos", "blocks.0", "blocks.1", "blocks.2", "ln_f"):
        assert graph.layer(name).output_bytes == hidden_bytes, name
    # after tok, the positions (int64) still have to reach pos
    assert graph.layer("tok").output_bytes == hidden_bytes + CFG.seq_len * 8
    assert graph.layer("head").output_bytes == BATCH * CFG.seq_len * CFG.vocab_size * 4


def test_gpt_tensor_parallel_groups():
    graph = _gpt_graph()
    attn, mlp = graph.layer("blocks.1").tp_groups
    assert attn.styles == {"blocks.1.attn.qkv": "colwise", "blocks.1.attn.proj": "rowwise"}
    assert attn.divisor == CFG.heads
    # qkv weight and bias and proj weight are sharded; proj's bias is added once, after the all-reduce: replicated
    assert attn.num_params == 4 * CFG.hidden * CFG.hidden + 3 * CFG.hidden
    assert attn.output_bytes == BATCH * CFG.seq_len * CFG.hidden * 4
    assert mlp.styles == {"blocks.1.mlp.fc": "colwise", "blocks.1.mlp.proj": "rowwise"}
    assert mlp.divisor == 4 * CFG.hidden
    # fc output (saved by gelu) and gelu output (saved by proj) are sharded
    assert mlp.activation_bytes == 2 * BATCH * CFG.seq_len * 4 * CFG.hidden * 4
    assert 0 < attn.activation_bytes < graph.layer("blocks.1").activation_bytes
    (emb,) = graph.layer("tok").tp_groups
    assert emb.styles == {"tok": "vocab_embedding"} and emb.divisor == CFG.vocab_size
    assert emb.activation_bytes == 0 and emb.output_bytes == BATCH * CFG.seq_len * CFG.hidden * 4
    (head,) = graph.layer("head").tp_groups
    assert head.styles == {"head": "vocab_head"} and head.divisor == CFG.vocab_size
    assert head.output_bytes == graph.layer("head").output_bytes
    assert graph.layer("pos").tp_groups == () and graph.layer("ln_f").tp_groups == ()
    assert graph.layer("blocks.0").tp_divisor == CFG.heads


def test_recompute_options_full_and_selective():
    graph = _gpt_graph()
    block = graph.layer("blocks.0")
    full, *selective = block.recompute_options
    input_bytes = BATCH * CFG.seq_len * CFG.hidden * 4
    assert full.module == "blocks.0" and full.forward_flops == block.flops
    assert full.saved_activation_bytes == block.activation_bytes - input_bytes
    assert [o.module for o in selective] == ["blocks.0.attn", "blocks.0.mlp"]
    assert all(0 < o.saved_activation_bytes < full.saved_activation_bytes for o in selective)
    assert all(0 < o.forward_flops < block.flops for o in selective)


def test_recompute_stops_after_the_last_saved_tensor():
    """Non-reentrant checkpointing stops once every saved tensor is back: a pre-norm block's recompute never
    reaches its MLP projection's output (the residual add saves nothing), a post-norm block's runs through it
    (its last norm saves the sum), so the collectives at that output run again only there. A deep stack, traced
    through one block of each kind and copied, names each copy's own modules."""
    x = torch.randint(0, CFG.vocab_size, (BATCH, CFG.seq_len))
    pre = autoplan.trace(GPT(CFG), x).layer("blocks.1")
    post = autoplan.trace(with_post_norm(GPT(CFG)), x).layer("blocks.1")
    attn, mlp = (g.styles for g in pre.tp_groups)
    assert pre.recompute_options[0].unreached == ("blocks.1.mlp", "blocks.1.mlp.proj")
    assert pre.recompute_options[0].reaches(attn) and not pre.recompute_options[0].reaches(mlp)
    assert post.recompute_options[0].unreached == ("blocks.1.ln2",)
    assert post.recompute_options[0].reaches(attn) and post.recompute_options[0].reaches(mlp)
    # a selective option stops after its own projection either way
    assert {o.module: o.unreached for o in post.recompute_options[1:]} == {
        "blocks.1.attn": ("blocks.1.attn.proj",), "blocks.1.mlp": ("blocks.1.mlp.proj",)}
    deep = GPTConfig(vocab_size=64, seq_len=8, hidden=32, layers=12, heads=4)
    graph = autoplan.trace(GPT(deep), torch.randint(0, 64, (2, 8)))
    assert graph.layer("blocks.7").recompute_options[0].unreached == ("blocks.7.mlp", "blocks.7.mlp.proj")


def test_containers_are_opened_and_wrappers_split():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = MLP(16, 32, depth=2)
            self.out = torch.nn.Linear(16, 2)

        def forward(self, x):
            return self.out(self.body(x))

    graph = autoplan.trace(Wrapper(), torch.randn(4, 16))
    assert [layer.name for layer in graph.layers] == [f"body.layers.{i}" for i in range(5)] + ["out"]


def test_summary_table_lists_every_layer_with_totals():
    graph = _gpt_graph()
    text = graph.summary()
    lines = text.splitlines()
    assert lines[0].startswith("GPT: ") and "traced by fx" in lines[0]
    assert len(lines) == 1 + 1 + 1 + len(graph.layers) + 1 + 1
    assert lines[-1].split()[0] == "total" and "KiB" in lines[-1]
    assert "blocks.2" in text and str(graph) == text


def test_op_graph_nodes_carry_shapes_and_modules():
    graph = _gpt_graph()
    g = graph.nx_graph
    qkv = [n for n, a in g.nodes(data=True) if a["module"] == "blocks.0.attn.qkv"]
    assert len(qkv) == 1
    attrs = g.nodes[qkv[0]]
    assert attrs["shape"] == (BATCH, CFG.seq_len, 3 * CFG.hidden)
    assert attrs["bytes"] == BATCH * CFG.seq_len * 3 * CFG.hidden * 4
    assert {"op", "target", "shape", "bytes", "module"} <= set(attrs)


def test_no_tensor_parallel_group_across_a_norm():
    class NormBetween(torch.nn.Module):
        """fc → LayerNorm → proj: the norm reduces over the features a colwise shard splits."""

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 32)
            self.norm = torch.nn.LayerNorm(32)
            self.proj = torch.nn.Linear(32, 16)

        def forward(self, x):
            return x + self.proj(self.norm(self.fc(x)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = NormBetween()
            self.out = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.out(self.block(x))

    graph = autoplan.trace(Net(), torch.randn(4, 16))
    assert all(layer.tp_groups == () for layer in graph.layers)
