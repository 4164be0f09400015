"""Tensor-parallel groups are offered only when a numerical shard of them equals the unsharded module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoplan
from autoplan.trace.opgraph import build_op_graph
from autoplan.trace.tp_check import check_tp_groups
from autoplan.trace.tp_heads import divide_head_attributes
from autoplan.trace.tp_groups import detect_tp_groups

import models_hf


class _MLP(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.up = nn.Linear(8, 32 if fused else 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        h = self.up(x)
        if self.fused:  # a fused gate/up projection cut in two halves by position (Phi-3's gate_up_proj)
            gate, up = h.chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up
        else:
            h = torch.relu(h)
        return x + self.down(h)


class _Outer(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.mlp = _MLP(fused)

    def forward(self, x):
        return self.mlp(x)


def _check(model, x):
    groups = [g for g in detect_tp_groups(build_op_graph(model, (x,), {}), model) if "rowwise" in g.styles.values()]
    return check_tp_groups(model, groups, (x,), {})


def test_a_megatron_pair_and_a_fused_gate_up_shard_part_by_part_are_kept_and_the_whole_block_shard_dropped():
    from autoplan.trace.tp_groups import DetectedGroup

    pair = {"mlp.up": "colwise", "mlp.down": "rowwise"}
    kept, dropped = _check(_Outer(fused=False), torch.randn(2, 8))
    assert [g.styles for g in kept] == [pair] and dropped == []
    # a fused gate/up cut by chunk(2) is proposed as colwise:2 (rank r holds [gate_r; up_r]) and proven sound
    model, x = _Outer(fused=True), torch.randn(2, 8)
    kept, dropped = _check(model, x)
    assert [g.styles for g in kept] == [{"mlp.up": "colwise:2", "mlp.down": "rowwise"}] and dropped == []
    # the same projection sharded as one block (rank r: rows r of t of [gate; up]) mixes gate and up: dropped
    whole = DetectedGroup(pair, kept[0].divisor, kept[0].output_node, kept[0].window)
    kept, dropped = check_tp_groups(model, [whole], (x,), {})
    assert kept == [] and [d.styles for d in dropped] == [pair]
    assert "computes other numbers (relative difference" in dropped[0].reason


class _GatedMLP(nn.Module):
    def __init__(self, inner: bool = False):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.inner = nn.Linear(8, 8) if inner else None

    def forward(self, x):
        h = self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))
        return self.inner(torch.tanh(h)) if self.inner is not None else h


def test_a_pair_feeding_the_next_blocks_colwise_directly_is_found_and_proven_and_an_inner_linear_is_not_rowwise():
    # no residual and no nonlinearity between blocks: each block's output goes straight into the next one's gate/up
    model, x = nn.Sequential(_GatedMLP(), _GatedMLP(), _GatedMLP()), torch.randn(4, 8)
    graph = autoplan.trace(model, x)
    assert [[g.styles for g in layer.tp_groups] for layer in graph.layers] == [
        [{f"{i}.gate": "colwise", f"{i}.up": "colwise", f"{i}.down": "rowwise"}] for i in range(3)]
    assert graph.tp_dropped == []  # each pair was sharded numerically and equals the unsharded block
    # a linear whose output goes on inside its own block (tanh, then another linear) is not a rowwise end
    model = nn.Sequential(_GatedMLP(inner=True), _GatedMLP())
    groups = [g.styles for g in detect_tp_groups(build_op_graph(model, (x,), {}), model)]
    assert groups == [{"0.down": "colwise", "0.inner": "rowwise"},
                      {"1.gate": "colwise", "1.up": "colwise", "1.down": "rowwise"}]


class _BiasOut(nn.Module):
    """Returns, besides its output, a tensor shaped by its head count that the next block reads (T5's cross-attention
    position bias): a shard would hand out its local heads' shape."""

    def __init__(self):
        super().__init__()
        self.n_heads, self.q, self.o = 4, nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, bias=None):
        h = self.o(torch.relu(self.q(x)))
        return h, (x.new_zeros(1, self.n_heads, 1) if bias is None else bias)


class _TwoBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _BiasOut(), _BiasOut()

    def forward(self, x):
        h, bias = self.a(x)
        h2, bias = self.b(h, bias)
        return h2 + bias.sum()


def test_a_pair_whose_parent_hands_out_another_tensor_is_not_offered_and_says_why():
    model, x = _TwoBias(), torch.randn(2, 8)
    refused: list = []
    groups = detect_tp_groups(build_op_graph(model, (x,), {}), model, refused)
    assert [g.styles for g in groups] == [{"b.q": "colwise", "b.o": "rowwise"}]
    assert [styles for styles, _ in refused] == [{"a.q": "colwise", "a.o": "rowwise"}]
    assert "hands the rest of the model a tensor besides its rowwise output" in refused[0][1]


def test_nanogpt_fused_qkv_split_by_position_is_kept_in_its_dtensor_form_with_its_mlp():
    model, idx = models_hf.fused_qkv_gpt()
    graph = autoplan.trace(model, idx)
    block = graph.layer("h.0")
    # view(B, T, n_head, C // n_head) with C from the input: no local-tensor shard is right (the check drops that
    # one), the global-shape DTensor form is proven and kept
    assert [g.styles for g in block.tp_groups] == [{"h.0.attn.c_attn": "colwise:3/dtensor", "h.0.attn.c_proj": "rowwise"},
                                                   {"h.0.mlp.c_fc": "colwise", "h.0.mlp.c_proj": "rowwise"}]
    assert graph.tp_dropped == []


def test_head_counts_are_divided_on_the_shard_and_restorable():
    attn = models_hf.FusedQKVAttention()
    undo = divide_head_attributes([attn], 2)
    assert (attn.n_head, attn.n_embd) == (2, 16)
    for module, name, value in undo:
        setattr(module, name, value)
    assert (attn.n_head, attn.n_embd) == (4, 32)


@pytest.mark.parametrize("family, kept, dropped", [
    ("opt", 4, 0),    # view(bsz, -1, num_heads, head_dim): sound once num_heads counts the local heads
    ("bart", 10, 0),  # cross-attention: q reads the decoder, k and v the encoder, all in one group
])
def test_families_keep_exactly_their_sound_groups(family, kept, dropped):
    model, inputs = models_hf.FAMILIES[family]()
    graph = autoplan.trace(model, inputs)
    pairs = [g for layer in graph.layers for g in layer.tp_groups if "rowwise" in g.styles.values()]
    assert (len(pairs), len(graph.tp_dropped)) == (kept, dropped)


def test_pinned_tp_shards_every_sound_group_and_says_why_when_nothing_can_be_sharded():
    cluster = autoplan.Cluster.preset("cpu", devices_per_node=4)
    model, idx = models_hf.fused_qkv_gpt()
    plan = autoplan.plan(model, idx, cluster=cluster, mesh={"dp": 2, "tp": 2}, precision="fp32", data_parallel="ddp")
    assert {f"h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")} \
        <= set(plan.tensor_parallel)
    assert plan.tensor_parallel["h.1.attn.c_attn"] == "colwise:3/dtensor"
    mlp = nn.Sequential(nn.Linear(8, 8), nn.Tanh())  # no colwise → rowwise pair at all
    plan = autoplan.plan(mlp, torch.randn(4, 8), cluster=cluster, mesh={"tp": 2}, precision="fp32")
    assert plan.tensor_parallel == {}
    assert plan.search.notes[0].startswith("tp=2 shards no module, so the 2 tp ranks repeat each other's work")


def test_a_replicated_weight_between_the_linears_drops_the_group_by_its_gradient():
    model, inputs = models_hf.FAMILIES["qwen3"]()
    graph = autoplan.trace(model, inputs)
    # per-head q/k norms: the forward is exact, but their replicated weights would get partial gradients
    pairs = [g for layer in graph.layers for g in layer.tp_groups if "rowwise" in g.styles.values()]
    assert len(pairs) == 2 and all("mlp" in next(iter(g.styles)) for g in pairs)
    reasons = [reason for styles, reason in graph.tp_dropped if any(f.endswith("q_proj") for f in styles)]
    assert len(reasons) == 2 and "q_norm.weight is used between the sharded linears" in reasons[0]


def test_gpt2_conv1d_pairs_and_fused_qkv_are_proposed_and_proven_and_wrong_layouts_are_dropped(monkeypatch):
    from autoplan.trace.tp_groups import DetectedGroup

    from transformers import GPT2Config, GPT2LMHeadModel

    from autoplan.trace.measure import measure
    from autoplan.trace.tp_check import record_parents

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=4))
    kwargs = {"input_ids": torch.randint(0, 64, (2, 8)), "use_cache": False}
    groups = [g for g in detect_tp_groups(build_op_graph(model, (), kwargs), model) if "rowwise" in g.styles.values()]
    mlp = {"transformer.h.0.mlp.c_fc": "colwise", "transformer.h.0.mlp.c_proj": "rowwise"}
    # c_attn fuses q, k and v, cut by .split(split_size): sharded part by part (rank r: [q_r; k_r; v_r])
    attn = {"transformer.h.0.attn.c_attn": "colwise:3", "transformer.h.0.attn.c_proj": "rowwise"}
    assert sorted(g.styles.items() for g in groups) == sorted([attn.items(), mlp.items()])
    assert [g.divisor for g in groups if g.styles == attn] == [4]  # the heads of each part
    recorded = measure(model, (), kwargs, record_inputs=record_parents(model, groups)).inputs
    kept, dropped = check_tp_groups(model, groups, (), kwargs, recorded)
    assert sorted(g.styles.items() for g in kept) == sorted([attn.items(), mlp.items()]) and dropped == []
    # the fused c_attn sharded as one block (rank r: rows r of t of [q; k; v]) mixes q, k and v: dropped
    whole = next(g for g in groups if g.styles == attn)
    plain = DetectedGroup({**attn, "transformer.h.0.attn.c_attn": "colwise"}, whole.divisor, whole.output_node,
                          whole.window)
    kept, dropped = check_tp_groups(model, [plain], (), kwargs, recorded)
    assert kept == [] and "computes other numbers" in dropped[0].reason
    # the same Conv1D pair sharded as if its weight were a Linear's (out, in) computes something else: dropped
    monkeypatch.setitem(check_tp_groups.__globals__, "is_conv1d", lambda module: False)
    kept, dropped = check_tp_groups(model, [g for g in groups if g.styles == mlp], (), kwargs, recorded)
    assert kept == [] and [d.styles for d in dropped] == [mlp]


def test_phi3_grouped_kv_qkv_is_kept_by_its_part_sizes_and_other_cuts_or_too_few_kv_heads_are_dropped():
    from dataclasses import replace

    from autoplan.trace.measure import measure
    from autoplan.trace.tp_check import record_parents

    # Phi-3 with 4 query and 2 key/value heads of 8 features: qkv_proj is sliced at unequal offsets (32 + 16 + 16)
    model, inputs = models_hf.FAMILIES["phi3"]()
    kwargs = {**inputs, "use_cache": False}
    groups = [g for g in detect_tp_groups(build_op_graph(model, (), kwargs), model) if "rowwise" in g.styles.values()]
    qkv = "model.layers.0.self_attn.qkv_proj"
    attn = next(g for g in groups if qkv in g.styles)
    assert attn.styles[qkv] == "colwise:32+16+16" and attn.divisor == 2  # the divisor divides the kv heads too
    recorded = measure(model, (), kwargs, record_inputs=record_parents(model, groups)).inputs
    kept, dropped = check_tp_groups(model, groups, (), kwargs, recorded)
    assert len(kept) == 4 and dropped == []  # attention and the fused gate/up MLP of both layers
    # the same projection cut as equal halves, as its parts in another order, or as one block mixes q, k and v
    # heads: dropped
    for wrong in ("colwise:2", "colwise:16+16+32", "colwise"):
        kept, dropped = check_tp_groups(model, [replace(attn, styles={**attn.styles, qkv: wrong})], (), kwargs,
                                        recorded)
        assert kept == [] and dropped[0].reason.startswith("a 2-way shard computes other numbers"), wrong
    # a single key/value head: no tp degree gives every rank whole key/value heads, so attention stays whole
    model, inputs = models_hf.hf_phi3(num_key_value_heads=1)
    graph = autoplan.trace(model, inputs)
    assert [styles[qkv] for styles, _ in graph.tp_dropped if qkv in styles] == ["colwise:32+8+8"]
    assert "the tp degree must divide the key/value heads" in graph.tp_dropped[0][1]
    assert len([g for layer in graph.layers for g in layer.tp_groups if "rowwise" in g.styles.values()]) == 2


def test_the_unequal_parts_exchange_hands_each_rank_its_rows_and_every_gradient_row_back():
    from autoplan.execute.tp_styles import _exchange_plan, compute_rows

    # the executor's all-to-all simulated in one process, on row numbers: stored rows r of t of the whole weight in,
    # rows r of t of every part out; backward's inverse exchange puts every row back where it is stored
    for sizes, t in [((32, 16, 16), 2), ((5120, 1280, 1280), 5), ((40, 10, 10), 10), ((8, 4, 4, 8), 4)]:
        stored = torch.arange(sum(sizes)).chunk(t)
        plans = [_exchange_plan(sizes, r, t) for r in range(t)]  # (send index, send counts, receive counts)
        sent = [stored[s][plans[s][0]].split(plans[s][1]) for s in range(t)]
        received = [torch.cat([sent[s][r] for s in range(t)]) for r in range(t)]
        for r in range(t):
            assert plans[r][2] == [len(sent[s][r]) for s in range(t)]
            assert torch.equal(received[r], compute_rows(sizes, r, t)), (sizes, t, r)
        returned = [received[r].split(plans[r][2]) for r in range(t)]
        for s in range(t):
            back = torch.empty_like(stored[s])
            back[plans[s][0]] = torch.cat([returned[r][s] for r in range(t)])
            assert torch.equal(back, stored[s]), (sizes, t, s)
