"""FLOPs and parameter counts from tracing against closed forms."""

from __future__ import annotations

import pytest
import torch

import autoplan
from autoplan.models import GPT, MLP, GPTConfig, gpt_forward_flops


@pytest.mark.parametrize("cfg", [GPTConfig(), GPTConfig(vocab_size=1000, seq_len=64, hidden=96, layers=3, heads=6)])
def test_gpt_forward_flops_match_closed_form(cfg):
    batch = 3
    graph = autoplan.trace(GPT(cfg), torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len)))
    expected = gpt_forward_flops(cfg, batch)
    assert abs(graph.forward_flops - expected) <= 0.02 * expected
    assert graph.forward_flops == sum(layer.flops for layer in graph.layers)


def test_backward_flops_are_about_twice_forward():
    cfg = GPTConfig(vocab_size=1000, seq_len=64, hidden=96, layers=3, heads=6)
    graph = autoplan.trace(GPT(cfg), torch.randint(0, cfg.vocab_size, (2, cfg.seq_len)))
    assert 1.9 * graph.forward_flops <= graph.backward_flops <= 2.2 * graph.forward_flops
    assert graph.backward_flops == sum(layer.backward_flops for layer in graph.layers)


def test_gpt_parameter_count_is_exact_with_tied_weight_once():
    model = GPT(GPTConfig())
    graph = autoplan.trace(model, torch.randint(0, 256, (2, 16)))
    assert graph.num_params == sum(p.numel() for p in model.parameters()) == 34176
    assert graph.layer("head").num_params == 0 and graph.layer("tok").num_params == 256 * 32
    assert sum(layer.num_params for layer in graph.layers) == graph.num_params
    assert graph.param_bytes == 4 * graph.num_params
    assert graph.tied_parameters == [("tok.weight", "head.weight")]


def test_mlp_linear_flops_per_layer():
    graph = autoplan.trace(MLP(16, 32, depth=2), torch.randn(4, 16))
    assert [layer.flops for layer in graph.layers] == [2 * 4 * 16 * 32, 0, 2 * 4 * 32 * 32, 0, 2 * 4 * 32 * 16]


def test_dtype_and_input_bytes():
    model = MLP(16, 32, depth=1).to(torch.bfloat16)
    graph = autoplan.trace(model, torch.randn(4, 16, dtype=torch.bfloat16))
    assert graph.dtype_bytes == 2 and graph.input_bytes == 4 * 16 * 2
