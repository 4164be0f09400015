"""Hugging Face models (transformers 5.x) traced through torch.export with their default configs (generation cache
on): FLOPs, activations, layers, TP groups, mixture-of-experts layers."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("transformers", reason="Hugging Face tracing tests need transformers")

import autoplan  # noqa: E402
from autoplan.models import GPTConfig, gpt_forward_flops  # noqa: E402
from autoplan.trace.adapters import trace_kwargs  # noqa: E402

import models_hf  # noqa: E402
from models_hf import BATCH, SEQ, VOCAB  # noqa: E402
from test_trace_activations import real_saved_bytes  # noqa: E402


@functools.cache
def traced(family: str):
    """(model, example inputs, graph) of a family's default toy model, traced once per session: several tests here
    read the same trace (they only read the graph; a real forward and backward leaves the weights as they are)."""
    model, inputs = models_hf.FAMILIES[family]()
    return model, inputs, autoplan.trace(model, inputs)


def _close(predicted: float, expected: float, share: float) -> bool:
    return abs(predicted - expected) <= share * expected


def llama_forward_flops(cfg, batch: int, seq: int) -> int:
    """Linear FLOPs 2·B·s·in·out for q, k, v, o, gate, up, down and the head, plus 4·B·s²·h for attention
    (Narayanan et al. SC'21 Eq. 3, with grouped key/value projections)."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    tokens = batch * seq
    per_layer = 2 * tokens * (h * h + 2 * h * kv + h * h + 3 * h * inter) + 4 * batch * seq * seq * h
    return cfg.num_hidden_layers * per_layer + 2 * tokens * h * cfg.vocab_size


def test_gpt2_traces_by_export_with_flops_activations_and_tied_head():
    model, inputs, graph = traced("gpt2")
    assert graph.method == "export" and graph.batch_size == BATCH
    cfg = GPTConfig(vocab_size=VOCAB, seq_len=SEQ, hidden=32, layers=2, heads=4)
    assert _close(graph.forward_flops, gpt_forward_flops(cfg, BATCH), 0.02)
    assert _close(graph.activation_bytes, real_saved_bytes(model, **inputs), 0.05)
    assert graph.num_params == sum(p.numel() for p in model.parameters())
    assert graph.tied_parameters == [("transformer.wte.weight", "lm_head.weight")]
    names = [layer.name for layer in graph.layers]
    assert names[-1] == "lm_head" and names[3:5] == ["transformer.h.0", "transformer.h.1"]
    assert graph.layer("transformer.h.0").kind == graph.layer("transformer.h.1").kind
    # Conv1D (weight (in, out)) pairs like a Linear; the fused c_attn is cut into 3 equal parts (q, k, v)
    p = "transformer.h.0"
    assert [g.styles for g in graph.layer(p).tp_groups] == [
        {f"{p}.attn.c_attn": "colwise:3", f"{p}.attn.c_proj": "rowwise"},
        {f"{p}.mlp.c_fc": "colwise", f"{p}.mlp.c_proj": "rowwise"}]


def test_llama_layers_flops_and_tensor_parallel_groups():
    model, _, graph = traced("llama")
    assert graph.method == "export"
    assert [layer.name for layer in graph.layers] == [
        "model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1", "model.norm", "lm_head",
    ]
    assert _close(graph.forward_flops, llama_forward_flops(model.config, BATCH, SEQ), 0.02)
    attn, mlp = graph.layer("model.layers.1").tp_groups
    p = "model.layers.1"
    assert attn.styles == {f"{p}.self_attn.q_proj": "colwise", f"{p}.self_attn.k_proj": "colwise",
                           f"{p}.self_attn.v_proj": "colwise", f"{p}.self_attn.o_proj": "rowwise"}
    assert attn.divisor == 2  # 4 query heads over 2 key/value heads: t must divide both
    assert mlp.styles == {f"{p}.mlp.gate_proj": "colwise", f"{p}.mlp.up_proj": "colwise",
                          f"{p}.mlp.down_proj": "rowwise"}
    assert mlp.divisor == 64
    assert attn.output_bytes == mlp.output_bytes == BATCH * SEQ * 32 * 4
    assert graph.layer("model.embed_tokens").tp_groups[0].styles == {"model.embed_tokens": "vocab_embedding"}
    assert graph.layer("lm_head").tp_groups[0].styles == {"lm_head": "vocab_head"}


def saved_as_a_step_runs_it(model, inputs) -> int:
    """What a real forward saves, run as a training step runs it (use_cache=False where forward takes it)."""
    return real_saved_bytes(model, **trace_kwargs(model, inputs))


def test_llama_activation_bytes_match_real_forward():
    """Grouped key/value heads (2 for 4 queries): transformers skips the causal mask in a real forward and keeps
    SDPA's grouped-query path; the trace's fake forward, which runs with the cache on, does too (without it,
    transformers could not tell on fake tensors that no sequences are packed: it built the mask, repeated K and V
    to every head, and the trace read 8% over)."""
    model, inputs = models_hf.hf_llama()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    graph = autoplan.trace(model, inputs)
    assert graph.activation_bytes == saved_as_a_step_runs_it(model, inputs)


@pytest.mark.parametrize("builder", ["hf_qwen2", "hf_mistral", "hf_bert", "hf_t5", "hf_vit"])
def test_more_families_trace_with_exact_params_and_activations(builder):
    assert models_hf.FAMILIES[builder[3:]] is getattr(models_hf, builder)
    model, inputs, graph = traced(builder[3:])
    assert graph.method == "export"
    assert graph.num_params == sum(p.numel() for p in model.parameters())
    assert graph.forward_flops > 0 and len(graph.layers) >= 4
    assert sum(len(layer.tp_groups) for layer in graph.layers) >= 4
    assert graph.pipeline_blocker is None  # T5 too: its dropouts run twice but hold no state
    assert graph.activation_bytes == saved_as_a_step_runs_it(model, inputs)  # grouped heads too (Llama's test)
    if builder == "hf_bert":
        assert graph.layer("bert.encoder.layer.0").kind == graph.layer("bert.encoder.layer.1").kind
        # q/k/v and the output projection sit in sibling modules (attention.self / attention.output)
        attn, mlp = graph.layer("bert.encoder.layer.0").tp_groups
        p = "bert.encoder.layer.0"
        assert attn.styles[f"{p}.attention.self.query"] == "colwise" and attn.divisor == 4
        assert attn.styles[f"{p}.attention.output.dense"] == "rowwise"
        assert mlp.styles == {f"{p}.intermediate.dense": "colwise", f"{p}.output.dense": "rowwise"}


@pytest.mark.slow
def test_llama_2_7b_default_config_on_meta_traces_exactly_and_plans_on_32_a100s():
    """The benchmark's own measurement (benchmarks/hf_real_size.py) in a fresh process, so that peak memory is the
    trace's: default LlamaConfig (Llama-2-7B), one sequence of 512 tokens on the meta device."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "hf_real_size.py"), "--one",
                           "llama-2-7b"], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["num_params"] == r["numel"] and 6.7e9 < r["num_params"] < 6.8e9
    assert abs(r["flops_error"]) < 0.02
    # wall time, or the process's CPU time where other work on a shared machine stretches the wall clock
    assert min(r["trace_s"], r["trace_cpu_s"]) < 30 and r["peak_rss_bytes"] < 2 * 2**30
    assert r["layers"] == 32 + 4 and r["tp_groups"] == 2 * 32 + 2 and r["tp_dropped"] == 0
    # transformers models pipeline (skeleton stages): on 32 A100s the planner splits Llama-2-7B into stages
    assert r["pipeline_blocker"] is None and not r["plan"].startswith("pp1×"), r["plan"]


QUICK_FAMILIES = ("llama",)  # GPT-2 and BART trace in other quick tests


@pytest.mark.parametrize("family", [
    f if f in QUICK_FAMILIES else pytest.param(f, marks=pytest.mark.slow) for f in models_hf.FAMILIES
])
def test_every_family_traces_with_its_default_config(family):
    model, _, graph = traced(family)
    assert getattr(model.config, "use_cache", True) is not False  # the default: a cache object in the output
    assert graph.method == "export"
    assert graph.num_params == sum(p.numel() for p in model.parameters())
    assert graph.forward_flops > 0 and graph.backward_flops > graph.forward_flops
    assert len(graph.layers) >= 4


def mixtral_forward_flops(cfg, batch: int, seq: int) -> int:
    """Llama's attention and head, plus per token: the router (h × experts) and top-k experts of 3·h·inter each."""
    h, inter, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    kv = cfg.num_key_value_heads * (h // heads)
    tokens = batch * seq
    attention = 2 * tokens * (2 * h * h + 2 * h * kv) + 4 * batch * seq * seq * h
    experts = 2 * tokens * (cfg.num_experts_per_tok * 3 * h * inter + h * cfg.num_local_experts)
    return cfg.num_hidden_layers * (attention + experts) + 2 * tokens * h * cfg.vocab_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixture_of_experts_grouped_matmuls_are_counted_exactly(dtype):
    # transformers runs the experts as one aten._grouped_mm per projection; its fake kernel takes bf16 only
    if dtype == torch.float32:
        model, _, graph = traced("mixtral")
    else:
        model, inputs = models_hf.hf_mixtral()
        model = model.to(dtype)
        graph = autoplan.trace(model, inputs)
    assert graph.forward_flops == mixtral_forward_flops(model.config, BATCH, SEQ)
    # backward: about twice the forward (input and weight gradients of every matmul)
    assert 1.9 < graph.backward_flops / graph.forward_flops < 2.2
