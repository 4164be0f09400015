"""The traced-once stack (autoplan.trace.repeat): a reduced-depth trace, replicated, equals the full trace field by
field; blocks that differ in anything that can change their costs are never merged."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import autoplan
from autoplan.models import GPT, GPTConfig
from autoplan.trace import repeat

import models_hf


def _full_trace(model, inputs, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(repeat, "MIN_DEPTH", 10**9)  # no stack qualifies: every block is traced
        return autoplan.trace(model, inputs)


def _graph_by_order(g) -> tuple[list, list, list]:
    """Node attributes (names left out), edges and argument lists by execution position."""
    index = {name: i for i, name in enumerate(g.nodes)}
    attrs = [{k: v for k, v in d.items() if k != "args"} for _, d in g.nodes(data=True)]
    args = [tuple(index.get(a, a) for a in d.get("args", ())) for _, d in g.nodes(data=True)]
    return attrs, sorted((index[u], index[v]) for u, v in g.edges), args


def _assert_same_graph(fast, full):
    for field in dataclasses.fields(full):
        if field.name in ("trace_s", "nx_graph"):
            continue
        assert getattr(fast, field.name) == getattr(full, field.name), field.name
    assert fast.layers == full.layers  # names, figures, tp groups, recompute options, param names: all of it
    assert _graph_by_order(fast.nx_graph) == _graph_by_order(full.nx_graph)


def test_gpt_stack_traced_once_equals_the_full_trace(monkeypatch):
    model, tokens = GPT(GPTConfig(layers=9)), torch.randint(0, 256, (2, 16))  # 9: head_dim 8 is no layer index
    assert repeat.repeated_stack(model) == repeat.RepeatedStack("blocks", 9)
    fast = autoplan.trace(model, tokens)
    full = _full_trace(model, tokens, monkeypatch)
    _assert_same_graph(fast, full)
    assert [len(layer.tp_groups) for layer in fast.layers if layer.name.startswith("blocks.")] == [2] * 9
    assert len(model.blocks) == 9  # the user's model is left whole


@pytest.mark.slow
def test_llama_stack_traced_once_equals_the_full_trace(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(repeat, "MIN_DEPTH", 5)  # the least depth with a replicated middle block: a short test
    model, inputs = models_hf.FAMILIES["llama"](num_hidden_layers=5)
    assert repeat.repeated_stack(model) == repeat.RepeatedStack("model.layers", 5)
    fast = autoplan.trace(model, inputs)
    full = _full_trace(model, inputs, monkeypatch)
    _assert_same_graph(fast, full)
    # the rotary tables every layer reads are counted once, at the first layer, in both
    assert fast.layer("model.layers.0").activation_bytes > fast.layer("model.layers.1").activation_bytes


def test_blocks_that_differ_are_not_merged():
    cfg = GPTConfig(layers=8)
    wide = GPT(cfg)
    wide.blocks[5].mlp.fc = torch.nn.Linear(cfg.hidden, 2 * cfg.hidden)  # a narrower MLP in one block
    wide.blocks[5].mlp.proj = torch.nn.Linear(2 * cfg.hidden, cfg.hidden)
    assert repeat.repeated_stack(wide) is None
    graph = autoplan.trace(wide, torch.randint(0, 256, (2, 16)))
    assert graph.layer("blocks.5").forward_flops < graph.layer("blocks.4").forward_flops
    assert graph.layer("blocks.5").kind != graph.layer("blocks.4").kind

    flagged = GPT(cfg)
    flagged.blocks[3].attn.sliding = True  # a plain attribute a forward could branch on
    assert repeat.repeated_stack(flagged) is None
    shared = GPT(cfg)
    shared.blocks[7].ln1.weight = shared.blocks[6].ln1.weight  # a weight shared between blocks
    assert repeat.repeated_stack(shared) is None
    short = GPT(GPTConfig(layers=repeat.MIN_DEPTH - 1))
    assert repeat.repeated_stack(short) is None


def test_a_stack_whose_middle_blocks_trace_differently_is_traced_in_full():
    """A forward that treats block 2 on its own (same structure, other ops) fails the repeat check."""

    class Skips(GPT):
        def forward(self, idx):
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
            for i, block in enumerate(self.blocks):
                x = block(x) if i != 2 else block(block(x))
            return self.head(self.ln_f(x))

    model, tokens = Skips(GPTConfig(layers=8)), torch.randint(0, 256, (2, 16))
    assert repeat.repeated_stack(model) is not None
    graph = autoplan.trace(model, tokens)  # the copy's blocks 1 and 2 differ: traced in full
    assert graph.layer("blocks.2").forward_flops == 2 * graph.layer("blocks.3").forward_flops
