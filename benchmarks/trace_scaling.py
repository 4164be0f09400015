"""Trace time and peak memory of autoplan.trace for GPT sizes from 125M to 175B on the meta device.

Each size runs in its own subprocess so that its peak RSS (``VmHWM``; ``ru_maxrss`` can carry the parent's peak over fork + exec) is its own.

    python benchmarks/trace_scaling.py [--out benchmarks/results/trace_scaling.json] [--presets gpt2-125m ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PRESETS = ["gpt2-125m", "gpt-350m", "gpt-1.3b", "gpt-6.7b", "gpt3-175b"]

_CHILD = """
import json, sys, time
import autoplan
from autoplan.models import gpt
model, (tokens,) = gpt(sys.argv[1], batch_size=1, device="meta")
started = time.perf_counter()
graph = autoplan.trace(model, tokens)
wall_s = time.perf_counter() - started
print(json.dumps({"preset": sys.argv[1], "num_params": graph.num_params, "layers": len(graph.layers),
                  "op_nodes": graph.nx_graph.number_of_nodes(), "method": graph.method,
                  "forward_flops": graph.forward_flops, "trace_s": wall_s,
                  "peak_rss_bytes": int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024}))
"""


def measure(preset: str) -> dict:
    """Trace one preset in a fresh interpreter and return its figures.

    Example:
        >>> measure("gpt2-125m")["num_params"]  # doctest: +SKIP
        124475904
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", _CHILD, preset], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"tracing {preset} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "trace_scaling.json"))
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    args = parser.parse_args(argv)
    rows = [measure(p) for p in args.presets]
    print(f"{'preset':<11} {'params':>10} {'layers':>6} {'op nodes':>8} {'trace':>8} {'peak RSS':>10}")
    for r in rows:
        print(f"{r['preset']:<11} {r['num_params'] / 1e9:>9.2f}B {r['layers']:>6} {r['op_nodes']:>8} "
              f"{r['trace_s']:>7.2f}s {r['peak_rss_bytes'] / 2**20:>8.0f} MiB")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "trace_scaling", "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
