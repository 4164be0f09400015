"""Selective recompute of a module two levels inside a layer (Megatron's ``blocks.i.attn.core``): offered by the
trace, priced at what it frees for real, and applied by ``autoplan.parallelize`` with the numbers of one process."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoplan
from autoplan.cost.layer import layer_cost
from autoplan.cluster import Cluster
from autoplan.execute.manual import manual_plan
from autoplan.execute.recompute import apply_recompute, is_recomputed
from autoplan.models import GPT, GPTConfig
from distributed_helpers import with_nested_cores
from test_trace_activations import real_saved_bytes

pytestmark = pytest.mark.filterwarnings("ignore")

# a·s/h = 8: the core's score tensors are about half of a block's saved bytes, as in large Megatron runs
CONFIG = GPTConfig(vocab_size=64, seq_len=32, hidden=16, layers=2, heads=4)
BATCH = 2
LAYERS = ["tok", "pos", "blocks.0", "blocks.1", "ln_f", "head"]
CORES = ["blocks.0.attn.core", "blocks.1.attn.core"]


def nested_gpt() -> GPT:
    """The GPT with Megatron-LM's ``CoreAttention`` (QKᵀ, causal softmax and ·V, scores materialised) nested two
    levels inside each block; tests/test_execute_distributed.py applies the same recompute under dp2×tp2."""
    torch.manual_seed(0)
    return with_nested_cores(GPT(CONFIG), CONFIG)


def batch():
    tokens = torch.randint(0, CONFIG.vocab_size, (BATCH, CONFIG.seq_len + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def test_core_two_levels_down_is_offered_and_frees_what_is_priced():
    model = nested_gpt()
    tokens, _ = batch()
    graph = autoplan.trace(model, tokens)
    block = graph.layer("blocks.0")
    options = {o.module: o for o in block.recompute_options}
    # the block (full), then its modules that save ≥ 25% of its bytes (not mlp here: the scores dwarf it)
    assert list(options) == ["blocks.0", "blocks.0.attn", "blocks.0.attn.core"]
    core, attn = options["blocks.0.attn.core"], options["blocks.0.attn"]
    # attn saves more than its core (the qkv output, proj's input) for two more linears: both kept
    assert core.saved_activation_bytes < attn.saved_activation_bytes
    assert core.forward_flops < attn.forward_flops

    # measured on real tensors: what recomputing the core takes off what autograd keeps for backward (its inputs,
    # q, k, v: views of the qkv output, stay saved for the recompute, as the option assumes)
    plain = real_saved_bytes(model, tokens)
    recomputed = copy.deepcopy(model)
    apply_recompute(recomputed, CORES)
    measured = (plain - real_saved_bytes(recomputed, tokens)) / len(CORES)
    assert measured > 0
    assert abs(core.saved_activation_bytes - measured) <= 0.02 * measured, (core.saved_activation_bytes, measured)

    # priced: the layer keeps exactly the option's bytes less
    args = dict(traced_batch_size=BATCH, traced_dtype_bytes=4, tp=1, microbatch_size=BATCH, precision="fp32",
                cluster=Cluster.preset("cpu"))
    assert (layer_cost(block, **args).activation_bytes - layer_cost(block, recompute=core, **args).activation_bytes
            == core.saved_activation_bytes)


def test_parallelize_recomputes_the_core_with_the_numbers_of_one_process():
    model, reference = nested_gpt(), nested_gpt()
    tokens, targets = batch()
    plan = manual_plan(model, [LAYERS], global_batch_size=BATCH, recompute=CORES)
    assert plan.stages[0].recompute == tuple(CORES)
    pm = autoplan.parallelize(model, plan=plan)
    assert all(is_recomputed(model.get_submodule(name)) for name in CORES)
    assert not is_recomputed(model.blocks[0].attn) and not is_recomputed(model.blocks[0])

    loss = pm.train_step(tokens, targets)
    logits = reference(tokens)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    expected.backward()
    assert abs(loss - expected.item()) <= 1e-5 * abs(expected.item())
    grads = dict(reference.named_parameters())
    for name, param in pm.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-6)


def test_a_wrapper_that_frees_what_its_child_frees_offers_one_option():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16))
            self.ff = nn.Sequential(nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)))

        def forward(self, x):
            x = x + self.attn(x)
            return x + self.ff(x)

    graph = autoplan.trace(nn.Sequential(Residual(), Residual()), torch.randn(8, 16))
    options = graph.layer("0").recompute_options
    # ff.0 frees ff's bytes for ff's FLOPs: left out. attn frees less than ff for as many FLOPs, and neither
    # re-runs its pair's all-reduce (each recomputation stops at its last linear, the last to save): left out too
    assert [g.styles for g in graph.layer("0").tp_groups] == [{"0.attn.0": "colwise", "0.attn.2": "rowwise"},
                                                              {"0.ff.0.0": "colwise", "0.ff.0.2": "rowwise"}]
    assert [o.module for o in options] == ["0", "0.ff"]
    assert len({(o.saved_activation_bytes, o.forward_flops) for o in options}) == len(options)
