"""Real-size transformers models on the meta device, default configs: trace time, peak memory, exact parameter
count, FLOPs against the closed form, and a plan on 32 A100s.

    python benchmarks/hf_real_size.py [--models llama-2-7b,t5-base] [--json out.json]

Each model runs in a fresh subprocess so that its peak resident memory is its own. Closed forms count the matmuls
(2 FLOPs per multiply-add: Narayanan et al. SC'21 Eq. 3 for the decoder blocks; the same terms for T5's encoder,
decoder and cross attention, and for ViT's patch projection); norms, softmax and activations are left out, which is
why the traced count may be a little higher. ``trace s`` is wall time, ``cpu s`` the process's CPU time (the
figure to read on a shared machine, where other work stretches the wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODELS = ("llama-2-7b", "mistral-7b", "mixtral-8x7b", "t5-base", "vit-b-16")
SEQ, GLOBAL_BATCH, NODES = 512, 256, 4


def _decoder_flops(h, inter, layers, heads, kv_heads, vocab, tokens, batch, seq, experts=None, top_k=None):
    kv = kv_heads * (h // heads)
    attention = 2 * tokens * (2 * h * h + 2 * h * kv) + 4 * batch * seq * seq * h
    if experts:
        mlp = 2 * tokens * (top_k * 3 * h * inter + h * experts)
    else:
        mlp = 2 * tokens * 3 * h * inter
    return layers * (attention + mlp) + 2 * tokens * h * vocab


def build(name: str):
    """(model on meta, example inputs, closed-form forward FLOPs)."""
    import torch
    import transformers as T

    ids = torch.zeros(1, SEQ, dtype=torch.long)
    with torch.device("meta"):
        if name in ("llama-2-7b", "mistral-7b", "mixtral-8x7b"):
            cfg = {"llama-2-7b": T.LlamaConfig(), "mistral-7b": T.MistralConfig(),
                   "mixtral-8x7b": T.MixtralConfig()}[name]
            model = {"llama-2-7b": T.LlamaForCausalLM, "mistral-7b": T.MistralForCausalLM,
                     "mixtral-8x7b": T.MixtralForCausalLM}[name](cfg)
            flops = _decoder_flops(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                                   cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size, SEQ, 1, SEQ,
                                   getattr(cfg, "num_local_experts", None), getattr(cfg, "num_experts_per_tok", None))
            return model, {"input_ids": ids}, flops
        if name == "t5-base":
            cfg = T.T5Config(d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12, decoder_start_token_id=0)
            model = T.T5ForConditionalGeneration(cfg)
            h, inner, dff, L, V = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.vocab_size
            t = SEQ  # encoder and decoder tokens alike
            attn = 2 * t * 4 * h * inner + 4 * t * t * inner
            ff = 2 * t * 2 * h * dff
            flops = L * (attn + ff) + L * (2 * attn + ff) + 2 * t * h * V
            return model, {"input_ids": ids, "decoder_input_ids": ids.clone()}, flops
        if name == "vit-b-16":
            cfg = T.ViTConfig()  # ViT-B/16 at 224×224
            model = T.ViTForImageClassification(cfg)
            h, inter, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
            patches = (cfg.image_size // cfg.patch_size) ** 2
            t = patches + 1
            flops = (2 * patches * 3 * cfg.patch_size ** 2 * h
                     + L * (2 * t * 4 * h * h + 4 * t * t * h + 2 * t * 2 * h * inter) + 2 * h * cfg.num_labels)
            return model, {"pixel_values": torch.zeros(1, 3, cfg.image_size, cfg.image_size)}, flops
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def measure_one(name: str) -> dict:
    import autoplan
    from autoplan.options import PlanOptions
    from autoplan.solve import search

    model, inputs, formula = build(name)
    numel = sum(p.numel() for p in model.parameters())
    started, started_cpu = time.perf_counter(), time.process_time()
    graph = autoplan.trace(model, inputs)
    trace_s, trace_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
    plan = search(graph, autoplan.Cluster.preset("a100-80gb", nodes=NODES),
                  PlanOptions(global_batch_size=GLOBAL_BATCH, precision="bf16"))  # autoplan.plan, traced once
    m = plan.mesh
    return {
        "model": name, "trace_s": round(trace_s, 2), "trace_cpu_s": round(trace_cpu_s, 2),
        "peak_rss_bytes": int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024,
        "num_params": graph.num_params, "numel": numel, "forward_flops": graph.forward_flops,
        "formula_flops": formula, "flops_error": graph.forward_flops / formula - 1,
        "layers": len(graph.layers), "tp_groups": sum(len(layer.tp_groups) for layer in graph.layers),
        "tp_dropped": len(graph.tp_dropped), "pipeline_blocker": graph.pipeline_blocker,
        "plan": f"pp{m.pp}×dp{m.dp}×tp{m.tp}",
        "step_time_s": plan.predicted.step_time_s if plan.predicted else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one)))
        return
    rows = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in args.models.split(","):
        done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    header = f"{'model':<14}{'params':>16}{'exact':>7}{'FLOP err':>10}{'trace s':>9}{'cpu s':>7}{'peak GiB':>10}" \
             f"{'groups':>8}{'dropped':>9}  plan on 32 A100s"
    print(header)
    for r in rows:
        print(f"{r['model']:<14}{r['num_params']:>16,}{str(r['num_params'] == r['numel']):>7}"
              f"{100 * r['flops_error']:>9.2f}%{r['trace_s']:>9.1f}{r['trace_cpu_s']:>7.1f}"
              f"{r['peak_rss_bytes'] / 2**30:>10.2f}"
              f"{r['tp_groups']:>8}{r['tp_dropped']:>9}  {r['plan']}")
    print(json.dumps(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
