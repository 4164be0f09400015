"""Planning wall time against model depth and cluster size, for GPT-shaped models traced on the meta device.

    python benchmarks/planning_time.py            # headline models, depths 12 → 192 layers, 8 → 4,096 A100s
    python benchmarks/planning_time.py --quick    # the headline models only (a few minutes)
    python benchmarks/planning_time.py --quick --repeats 5 --out results.json

The first headline figure is what a user waits for: GPT-3 175B on 1,024 A100s planned by ``autoplan.plan`` in a
fresh Python process (a child process per run, median of ``--repeats``): ``first_s`` is that first call (it
includes importing the solver, which OR-Tools' ``cp_model`` module makes import pandas; ``solver_import_s`` and
``pandas_import_s`` time those imports apart, in another fresh process), ``warm_s`` the same call again in that
process, and ``import_s`` the ``import autoplan`` before it (torch and the executor's ``torch.distributed``
modules), reported beside the call, not inside it.

The other headline rows time the two halves of ``autoplan.plan`` on one model each — ``autoplan.trace`` and
:func:`autoplan.solve.search` — and their total: GPT-3 175B on 1,024 A100s (the README's example), a 24-layer
GPT (hidden 4096) on 64 and Llama-2-7B (transformers' default ``LlamaConfig``, 512 tokens) on 32. Each figure is
the median of ``--repeats`` runs, and the earlier path is timed beside the current one in the same process, so
that their ratio holds on a busy machine:

- ``trace_s``: a trace with no soundness verdicts remembered (what a process's first trace pays), and
  ``trace_again_s``: the same model traced again, the tensor-parallel verdicts reused
  (:mod:`autoplan.trace.tp_check_key`);
- ``search_s``: the search up to the chosen plan (``autoplan.plan`` returns then), ``alternatives_s``: judging
  the alternatives on the first read of ``plan.search.alternatives``, and ``eager_search_s``: the search that
  judges them before returning (``lazy_alternatives=False``, the earlier path); both plans are compared field by
  field (``same_plan``);
- ``total_s`` = trace + search, ``eager_total_s`` = trace + eager search.

``--cpu-deadline`` counts the search's overall deadline (``time_limit_s``, 10 s) in this process's CPU seconds
instead of wall seconds: on a machine so busy that 10 s of wall time is not enough for a search of a few CPU
seconds, the wall-clock deadline would otherwise cut the search short (``FEASIBLE``, or no layout at all), and
the plans would no longer be the ones a quiet machine finds.

Wall seconds and the process's CPU seconds are both reported: on a machine shared with other jobs the wall
clock stretches, CPU time much less. In the grid each model is traced once and planned for every cluster size.
Published planning times of other planners sit beside the table for scale; they ran other searches on other
machines, so only the order of magnitude compares.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autoplan  # noqa: E402
from autoplan.errors import InfeasiblePlanError  # noqa: E402
from autoplan.models import gpt  # noqa: E402
from autoplan.options import PlanOptions  # noqa: E402
from autoplan.solve import search  # noqa: E402
from autoplan.trace.tp_check_key import VERDICTS  # noqa: E402

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


class _CpuClock:
    """Stands in for the search module's ``time``: its deadline then counts CPU seconds (``--cpu-deadline``)."""

    perf_counter = staticmethod(time.process_time)


def _plan_fields(plan) -> dict:
    d = plan.to_dict()
    d["search"] = {k: v for k, v in d["search"].items() if k != "wall_s"}
    return d


def headline(repeats: int = 1, only: str | None = None) -> list[dict]:
    """trace, search, alternatives and their totals (median wall and CPU seconds over ``repeats`` runs), with
    the earlier paths (no remembered verdicts, alternatives judged before returning) timed beside them."""
    rows = []
    for name, build, devices, batch in HEADLINE:
        if only and only.lower() not in name.lower():
            continue
        model, inputs = build()
        cluster = autoplan.Cluster.preset("a100-80gb", nodes=max(1, devices // 8), devices_per_node=min(8, devices))
        options = PlanOptions(global_batch_size=batch)
        runs: dict[str, list[float]] = {}
        same, deadline_hit = True, 0
        for r in range(repeats):
            VERDICTS.clear()
            graph, *t = _timed(lambda: autoplan.trace(model, inputs))
            _, *t_again = _timed(lambda: autoplan.trace(model, inputs))
            first_lazy = r % 2 == 0  # alternate the order, so that neither path always runs on a warmer process
            try:
                for lazy in ((True, False) if first_lazy else (False, True)):
                    if lazy:
                        plan, *s = _timed(lambda: search(graph, cluster, options))
                        _, *a = _timed(lambda: plan.search.alternatives.resolve())
                    else:
                        eager, *e = _timed(lambda: search(graph, cluster, options, lazy_alternatives=False))
            except InfeasiblePlanError as exc:  # the 10 s wall-clock deadline, on a machine busy with other jobs
                print(f"  run {r + 1}: {str(exc)[:100]}…", flush=True)
                deadline_hit += 1
                continue
            # a plan cut short by the wall-clock deadline (FEASIBLE) may differ by chance: only proven ones compare
            if plan.search.status == eager.search.status == "OPTIMAL":
                same = same and _plan_fields(plan) == _plan_fields(eager)
            for key, (wall, cpu) in {"trace": t, "trace_again": t_again, "search": s, "alternatives": a,
                                     "eager_search": e}.items():
                runs.setdefault(f"{key}_s", []).append(wall)
                runs.setdefault(f"{key}_cpu_s", []).append(cpu)
        if not runs:
            print(f"{name:18} {devices:5d} GPUs  every run hit the search's deadline", flush=True)
            continue
        med = {k: statistics.median(v) for k, v in runs.items()}
        for unit in ("_s", "_cpu_s"):
            med[f"total{unit}"] = statistics.median(
                [a + b for a, b in zip(runs[f"trace{unit}"], runs[f"search{unit}"])])
            med[f"eager_total{unit}"] = statistics.median(
                [a + b for a, b in zip(runs[f"trace{unit}"], runs[f"eager_search{unit}"])])
        row = {"model": name, "params": graph.num_params, "layers": len(graph.layers), "devices": devices,
               "global_batch_size": batch, "repeats": repeats, **med, "runs": runs, "same_plan": same,
               "deadline_hit": deadline_hit,
               "status": plan.search.status, "mesh": str(plan.mesh), "step_time_s": plan.predicted.step_time_s}
        rows.append(row)
        print(f"{name:18} {devices:5d} GPUs  trace {med['trace_s']:5.2f} s (again {med['trace_again_s']:5.2f})  "
              f"search {med['search_s']:5.2f} s + alternatives {med['alternatives_s']:5.2f} s (eager "
              f"{med['eager_search_s']:5.2f} s)  total {med['total_s']:5.2f} s (eager {med['eager_total_s']:5.2f}; "
              f"CPU {med['total_cpu_s']:.2f} vs {med['eager_total_cpu_s']:.2f})  {plan.search.status} {plan.mesh} → "
              f"{plan.predicted.step_time_s:.2f} s{'' if same else '  PLANS DIFFER'}", flush=True)
    return rows


# What a fresh process pays, timed in a child process of its own per run: the import of autoplan (torch
# and the executor's torch.distributed modules), the first ``autoplan.plan`` call (which also imports the solver:
# OR-Tools' ``cp_model`` module imports pandas unconditionally at its top, so that import is timed apart in a
# second child), and the same call again in the same process.
_CHILD = """
import json, time
start = {start}
import autoplan
from autoplan.models import gpt
imported = (time.perf_counter(), time.process_time())
model, inputs = gpt("gpt3-175b", batch_size=1, device="meta")
cluster = autoplan.Cluster.preset("a100-80gb", nodes=128, devices_per_node=8)
calls, plans = [], []
for _ in range(2):
    wall, cpu = time.perf_counter(), time.process_time()
    plans.append(autoplan.plan(model, inputs, cluster=cluster, global_batch_size={batch}))
    calls.append((time.perf_counter() - wall, time.process_time() - cpu))
print(json.dumps({{"import_s": imported[0] - start[0], "import_cpu_s": imported[1] - start[1],
             "first_s": calls[0][0], "first_cpu_s": calls[0][1], "warm_s": calls[1][0], "warm_cpu_s": calls[1][1],
             "status": plans[0].search.status, "mesh": str(plans[0].mesh),
             "step_time_s": plans[0].predicted.step_time_s,
             "same_plan": plans[0].predicted == plans[1].predicted and plans[0].stages == plans[1].stages}}))
"""

_SOLVER_IMPORT = """
import json, time
import autoplan
wall, cpu = time.perf_counter(), time.process_time()
import pandas
pandas_s = (time.perf_counter() - wall, time.process_time() - cpu)
import autoplan.solve
print(json.dumps({"solver_import_s": time.perf_counter() - wall, "solver_import_cpu_s": time.process_time() - cpu,
            "pandas_import_s": pandas_s[0], "pandas_import_cpu_s": pandas_s[1]}))
"""


def _child(code: str) -> dict:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def first_call(repeats: int = 3) -> dict:
    """GPT-3 175B on 1,024 A100s as the issue times it: ``autoplan.plan`` in a fresh Python process (median of
    ``repeats`` processes, wall and CPU seconds), with the import of autoplan, the solver's import inside the first
    call (and the pandas import OR-Tools forces on it), and a second, warm call reported beside it."""
    runs: dict[str, list] = {}
    for _ in range(repeats):
        child = _CHILD.format(start="(time.perf_counter(), time.process_time())", batch=GLOBAL_BATCH)
        for key, value in {**_child(child), **_child(_SOLVER_IMPORT)}.items():
            runs.setdefault(key, []).append(value)
    row = {k: (statistics.median(v) if isinstance(v[0], float) else v[-1]) for k, v in runs.items()}
    row.update(model="GPT-3 175B", devices=1024, global_batch_size=GLOBAL_BATCH, repeats=repeats, runs=runs,
               same_plan=all(runs["same_plan"]) and len(set(runs["mesh"])) == 1)
    print(f"GPT-3 175B  1024 GPUs, fresh process: first autoplan.plan {row['first_s']:.2f} s "
          f"(CPU {row['first_cpu_s']:.2f}; solver import inside it {row['solver_import_cpu_s']:.2f}, of which "
          f"pandas {row['pandas_import_cpu_s']:.2f})  warm call {row['warm_s']:.2f} s (CPU {row['warm_cpu_s']:.2f})"
          f"  import autoplan {row['import_s']:.2f} s (CPU {row['import_cpu_s']:.2f})  {row['status']} "
          f"{row['mesh']} → {row['step_time_s']:.2f} s{'' if row['same_plan'] else '  PLANS DIFFER'}", flush=True)
    return row


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
    parser.add_argument("--quick", action="store_true", help="the headline models only (a few minutes)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per headline figure (their median)")
    parser.add_argument("--only", help="the headline models whose name contains this (e.g. 'GPT-3')")
    parser.add_argument("--cpu-deadline", action="store_true",
                        help="count the search's deadline in CPU seconds (for a machine busy with other jobs)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "planning_time.json"))
    args = parser.parse_args(argv)
    if args.cpu_deadline:
        import autoplan.solve as solve_module

        solve_module.time = _CpuClock
    print("headline: autoplan.plan in a fresh process (what the issue times), then trace + search in this one")
    fresh = first_call(args.repeats) if not args.only or args.only.lower() in "gpt-3 175b" else None
    top = headline(args.repeats, args.only)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()}, "first_call": fresh, "headline": top,
              "cpu_deadline": args.cpu_deadline}
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
