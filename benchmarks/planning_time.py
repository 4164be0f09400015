"""Planning wall time against model depth and cluster size, for GPT-shaped models traced on the meta device.

    python benchmarks/planning_time.py            # headline models, depths 12 → 192 layers, 8 → 4,096 A100s
    python benchmarks/planning_time.py --quick    # the headline models only (about a minute)
    python benchmarks/planning_time.py --out results.json

Headline rows time the two halves of ``autoplan.plan`` on one model each — ``autoplan.trace`` and
:func:`autoplan.solve.search` — and their total: GPT-3 175B on 1,024 A100s (the README's example), a 24-layer
GPT (hidden 4096) on 64 and Llama-2-7B (transformers' default ``LlamaConfig``, 512 tokens) on 32. Wall seconds
and the process's CPU seconds are both reported: on a machine shared with other jobs the wall clock stretches,
CPU time much less. In the grid each model is traced once and planned for every cluster size. Published
planning times of other planners sit beside the table for scale; they ran other searches on other machines, so
only the order of magnitude compares.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autoplan  # noqa: E402
from autoplan.errors import InfeasiblePlanError  # noqa: E402
from autoplan.models import gpt  # noqa: E402
from autoplan.options import PlanOptions  # noqa: E402
from autoplan.solve import search  # noqa: E402

# As reported by each project (other search spaces, other machines).
PUBLISHED = [
    {"planner": "Alpa (Zheng et al., OSDI 2022)", "model": "GPT 1.3B", "devices": 4, "planning_s": 4092},
    {"planner": "meta-pytorch/autoparallel", "model": "Llama-3-8B", "devices": 64, "planning_s": 52},
]

GLOBAL_BATCH = 1536
FULL = {"depths": [12, 24, 48, 96, 192], "devices": [8, 64, 512, 1024, 4096]}


def trace_gpt(layers: int, hidden: int = 4096, heads: int = 32) -> tuple[autoplan.ModelGraph, float]:
    model, inputs = gpt("gpt-6.7b", batch_size=1, device="meta", layers=layers, hidden=hidden, heads=heads)
    start = time.perf_counter()
    graph = autoplan.trace(model, inputs)
    return graph, time.perf_counter() - start


def plan_once(graph: autoplan.ModelGraph, devices: int) -> dict:
    cluster = autoplan.Cluster.preset("a100-80gb", nodes=max(1, devices // 8), devices_per_node=min(8, devices))
    start = time.perf_counter()
    try:
        plan = search(graph, cluster, PlanOptions(global_batch_size=GLOBAL_BATCH))
    except InfeasiblePlanError as exc:
        return {"devices": devices, "planning_s": time.perf_counter() - start, "status": "INFEASIBLE",
                "note": str(exc)[:120]}
    return {
        "devices": devices, "planning_s": time.perf_counter() - start, "status": plan.search.status,
        "gap": plan.search.gap, "candidates": plan.search.candidates, "mesh": str(plan.mesh),
        "schedule": plan.schedule + (f" v={plan.virtual_stages}" if plan.virtual_stages > 1 else ""),
        "microbatch": f"{plan.microbatch_size}×{plan.microbatches}", "data_parallel": plan.data_parallel,
        "step_time_s": plan.predicted.step_time_s,
    }


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _llama_2_7b():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hf_real_size import build  # noqa: E402 - the benchmark beside this one builds it on meta

    model, inputs, _ = build("llama-2-7b")
    return model, inputs


HEADLINE = [  # (name, build, devices, global batch)
    ("GPT-3 175B", autoplan.models.gpt3_175b, 1024, GLOBAL_BATCH),
    ("GPT h=4096 L=24", lambda: gpt("gpt-6.7b", batch_size=1, device="meta", layers=24), 64, GLOBAL_BATCH),
    ("Llama-2-7B", _llama_2_7b, 32, 256),
]


def headline() -> list[dict]:
    """trace, search and their total (wall and CPU seconds) for the headline models."""
    rows = []
    for name, build, devices, batch in HEADLINE:
        model, inputs = build()
        graph, trace_s, trace_cpu_s = _timed(lambda: autoplan.trace(model, inputs))
        cluster = autoplan.Cluster.preset("a100-80gb", nodes=max(1, devices // 8), devices_per_node=min(8, devices))
        plan, search_s, search_cpu_s = _timed(lambda: search(graph, cluster, PlanOptions(global_batch_size=batch)))
        row = {"model": name, "params": graph.num_params, "layers": len(graph.layers), "devices": devices,
               "global_batch_size": batch, "trace_s": trace_s, "search_s": search_s, "total_s": trace_s + search_s,
               "trace_cpu_s": trace_cpu_s, "search_cpu_s": search_cpu_s, "total_cpu_s": trace_cpu_s + search_cpu_s,
               "status": plan.search.status, "mesh": str(plan.mesh), "step_time_s": plan.predicted.step_time_s}
        rows.append(row)
        print(f"{name:18} {devices:5d} GPUs  trace {trace_s:5.2f} s ({trace_cpu_s:.2f} CPU)  search {search_s:5.2f} s "
              f"({search_cpu_s:.2f} CPU)  total {trace_s + search_s:5.2f} s ({trace_cpu_s + search_cpu_s:.2f} CPU)  "
              f"{plan.search.status} {plan.mesh} → {plan.predicted.step_time_s:.2f} s", flush=True)
    return rows


def run(depths: list[int], devices: list[int]) -> dict:
    rows = []
    for layers in depths:
        graph, trace_s = trace_gpt(layers)
        for n in devices:
            row = {"model": f"GPT h=4096 L={layers}", "params": graph.num_params, "layers": len(graph.layers),
                   "trace_s": trace_s, **plan_once(graph, n)}
            rows.append(row)
            print(_line(row), flush=True)
    return {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "global_batch_size": GLOBAL_BATCH, "cluster": "a100-80gb (8 per node)", "rows": rows,
        "published": PUBLISHED,
    }


HEADER = f"{'model':22} {'params':>8} {'devices':>7} {'trace':>7} {'plan':>7}  {'status':9} {'cand.':>6}  layout"


def _line(r: dict) -> str:
    layout = (f"{r['mesh']} {r['schedule']} mb={r['microbatch']} {r['data_parallel']} → {r['step_time_s']:.2f} s"
              if "mesh" in r else r.get("note", ""))
    return (f"{r['model']:22} {r['params'] / 1e9:7.1f}B {r['devices']:7d} {r['trace_s']:6.1f}s {r['planning_s']:6.2f}s"
            f"  {r['status']:9} {r.get('candidates', 0):6d}  {layout}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the headline models only (about a minute)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "planning_time.json"))
    args = parser.parse_args(argv)
    print("headline: trace + search = autoplan.plan")
    top = headline()
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()}, "headline": top}
    if not args.quick:
        print()
        print(HEADER)
        result.update(run(FULL["depths"], FULL["devices"]))
    print("\npublished planning times (other planners, other machines):")
    for p in PUBLISHED:
        print(f"  {p['planner']:34} {p['model']:12} {p['devices']:4d} devices  {p['planning_s']:,} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
