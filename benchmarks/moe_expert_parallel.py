"""A Qwen1.5-MoE-A2.7B-sized model planned without and with expert parallelism, priced by the cost model.

    python benchmarks/moe_expert_parallel.py                 # 4 A100-80GB, global batch 16 × 2048 tokens, bf16
    python benchmarks/moe_expert_parallel.py --out results.json

transformers' ``Qwen2MoeForCausalLM`` at Qwen1.5-MoE-A2.7B's sizes (hidden 2048, 24 layers of 60 routed experts of
width 1408, top-4, a shared expert of width 5632, vocabulary 151,936: 14.3 B parameters, 12.5 B in experts) is
built on the meta device and traced once; then ``autoplan.plan`` runs with ``expert_parallel`` off, ``True`` (DDP
and FSDP pinned, and the kind left free) and ``"auto"`` on 4 A100-80GB (global batch 16), and off and ``"auto"`` on
6 A100-80GB of one node (global batch 24: 6 ranks of 10 experts each). Each row prints the layout, the predicted step time and
peak memory per device, the model states per device and the search's CPU seconds; ``"auto"`` also prints its note
(both prices). Nothing runs on a GPU: these are the cost model's figures for the executor's layouts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import autoplan

GiB = 2**30


def qwen_moe_model() -> tuple[torch.nn.Module, torch.Tensor]:
    """Qwen1.5-MoE-A2.7B's shapes on meta, traced on one sample of 2048 tokens."""
    import transformers

    config = transformers.Qwen2MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        num_experts=60, num_experts_per_tok=4, max_position_embeddings=8192)
    with torch.device("meta"):
        model = transformers.Qwen2MoeForCausalLM(config)
    return model, torch.zeros(1, 2048, dtype=torch.long, device="meta")


def row(name: str, graph: autoplan.ModelGraph, plan: autoplan.Plan, cpu_s: float) -> dict:
    """One printed row: the plan's layout and its price."""
    from autoplan.cost.plan_cost import estimate_breakdown

    rank = max(estimate_breakdown(graph, plan).ranks, key=lambda r: r.model_state_bytes)
    return {"case": name, "mesh": str(plan.mesh), "data_parallel": plan.data_parallel,
            "fsdp_reshard": plan.fsdp_reshard, "expert_parallel": plan.expert_parallel,
            "microbatches": plan.microbatches, "recomputed": len(plan.recompute),
            "step_s": round(plan.predicted.step_time_s, 4),
            "peak_gib": round(max(plan.predicted.peak_memory_bytes) / GiB, 2),
            "states_gib": round(rank.model_state_bytes / GiB, 2), "dp_sync_s": round(rank.dp_sync_s, 4),
            "plan_cpu_s": round(cpu_s, 2), "notes": [n for n in plan.search.notes if "expert" in n]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_expert_parallel.json"))
    args = parser.parse_args(argv)
    from autoplan.options import PlanOptions
    from autoplan.solve import search
    from autoplan.solve.experts import plan_with_expert_parallel

    model, inputs = qwen_moe_model()
    start = time.process_time()
    graph = autoplan.trace(model, inputs)
    trace_s = time.process_time() - start
    four, six = (autoplan.Cluster.preset("a100-80gb", devices_per_node=n) for n in (4, 6))
    rows = []
    for name, cluster, batch, kw in (
            ("off", four, 16, dict(expert_parallel=False)),
            ("off, dp4 by DDP", four, 16, dict(mesh={"dp": 4}, data_parallel="ddp")),
            ("off, dp4 by FSDP", four, 16, dict(mesh={"dp": 4}, data_parallel="fsdp")),
            ("True, DDP", four, 16, dict(expert_parallel=True, data_parallel="ddp")),
            ("True, FSDP", four, 16, dict(expert_parallel=True, data_parallel="fsdp")),
            ("True", four, 16, dict(expert_parallel=True)), ("auto", four, 16, dict(expert_parallel="auto")),
            ("6 GPUs: off", six, 24, dict(expert_parallel=False)),
            ("6 GPUs: auto", six, 24, dict(expert_parallel="auto"))):
        options = PlanOptions(global_batch_size=batch, precision="bf16", **kw)
        start = time.process_time()
        try:
            plan = plan_with_expert_parallel(graph, cluster, options, search)
        except autoplan.InfeasiblePlanError as e:
            rows.append({"case": name, "infeasible": str(e)[:200]})
            continue
        rows.append(row(name, graph, plan, time.process_time() - start))
    print(f"Qwen1.5-MoE-A2.7B-sized ({graph.num_params / 1e9:.1f} B parameters), A100-80GB, 2048 tokens per sample "
          f"(global batch 16 on 4 GPUs, 24 on 6), bf16; trace {trace_s:.1f} CPU-s")
    print(f"{'case':<18} {'mesh':<14} {'dp':<5} {'ep':>3} {'m':>3} {'rc':>3} {'step s':>8} {'peak GiB':>9} "
          f"{'states':>7} {'sync s':>7} {'plan s':>7}")
    for r in rows:
        if "infeasible" in r:
            print(f"{r['case']:<18} no layout fits: {r['infeasible'][:90]}")
            continue
        kind = r["data_parallel"] + ("/mb" if r["fsdp_reshard"] == "microbatch" else "")
        print(f"{r['case']:<18} {r['mesh']:<14} {kind:<5} {r['expert_parallel']:>3} {r['microbatches']:>3} "
              f"{r['recomputed']:>3} {r['step_s']:>8.4f} {r['peak_gib']:>9.2f} {r['states_gib']:>7.2f} "
              f"{r['dp_sync_s']:>7.4f} {r['plan_cpu_s']:>7.2f}")
        for note in r["notes"]:
            print(f"{'':<18} {note}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"trace_cpu_s": round(trace_s, 2), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
