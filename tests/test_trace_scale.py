"""GPT-3 175B on the meta device: traced without weights, fast and in little memory."""

from __future__ import annotations

import resource
import time

import pytest

import autoplan
from autoplan.models import GPTConfig, gpt, gpt_forward_flops


@pytest.mark.slow
def test_gpt3_175b_on_meta_traces_quickly_with_exact_params():
    model, (tokens,) = gpt("gpt3-175b", batch_size=1, device="meta")
    started = time.perf_counter()
    graph = autoplan.trace(model, tokens)
    assert time.perf_counter() - started < 30
    expected = sum(p.numel() for p in model.parameters())
    assert graph.num_params == expected and abs(graph.num_params - 174.6e9) < 0.05e9
    assert abs(graph.forward_flops - gpt_forward_flops(GPTConfig.preset("gpt3-175b"), 1)) <= 0.02 * graph.forward_flops
    assert len(graph.layers) == 96 + 4 and len({graph.layer(f"blocks.{i}").kind for i in range(96)}) == 1
    assert graph.layer("blocks.0").tp_divisor == 96
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 2 * 2**20  # KiB on Linux: 2 GiB
