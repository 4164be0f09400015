"""Saved-activation bytes predicted by tracing (fake tensors) against a measurement on real CPU tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoplan
from autoplan.models import GPT, MLP, Block, GPTConfig


def real_saved_bytes(model: nn.Module, *args, **kwargs) -> int:
    """Bytes autograd keeps for backward in a real forward: each storage once, parameters and buffers left out."""
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*args, **kwargs)
    del out
    return sum(seen.values())


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(16, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _check(model, *args):
    predicted = autoplan.trace(model, tuple(args)).activation_bytes
    measured = real_saved_bytes(model, *args)
    assert measured > 0
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)
    return predicted, measured


def test_mlp_activation_bytes_match_real_forward():
    _check(MLP(64, 256, depth=3), torch.randn(8, 64))


def test_cnn_activation_bytes_match_real_forward():
    _check(SmallCNN(), torch.randn(4, 3, 16, 16))


def test_gpt_block_activation_bytes_match_real_forward():
    _check(Block(GPTConfig(hidden=64, heads=4, seq_len=32)), torch.randn(2, 32, 64))


def test_small_gpt_activation_bytes_match_real_forward():
    cfg = GPTConfig(vocab_size=512, seq_len=32, hidden=64, layers=3, heads=4)
    _check(GPT(cfg), torch.randint(0, cfg.vocab_size, (2, cfg.seq_len)))


def test_parameters_are_not_activations():
    # A lone Linear on an input that needs no grad saves only its input: the weight must not be counted.
    graph = autoplan.trace(nn.Linear(16, 32), torch.randn(4, 16))
    assert graph.activation_bytes == 4 * 16 * 4


@pytest.mark.parametrize("layer", ["blocks.0", "blocks.1"])
def test_activation_bytes_split_per_block(layer):
    cfg = GPTConfig(vocab_size=512, seq_len=32, hidden=64, layers=2, heads=4)
    graph = autoplan.trace(GPT(cfg), torch.randint(0, cfg.vocab_size, (2, cfg.seq_len)))
    real = real_saved_bytes(Block(cfg), torch.randn(2, cfg.seq_len, cfg.hidden))
    assert abs(graph.layer(layer).activation_bytes - real) <= 0.05 * real
