"""GPT-3 175B on the meta device: traced without weights, fast and in little memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Run in a fresh interpreter so that its peak RSS (VmHWM) is the trace's own, not that of earlier tests.
_CHILD = """
import json, time
import autoplan
from autoplan.models import GPTConfig, gpt, gpt_forward_flops
model, (tokens,) = gpt("gpt3-175b", batch_size=1, device="meta")
started = time.perf_counter()
graph = autoplan.trace(model, tokens)
print(json.dumps({
    "trace_s": time.perf_counter() - started,
    "peak_rss_bytes": int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024,
    "num_params": graph.num_params,
    "numel": sum(p.numel() for p in model.parameters()),
    "forward_flops": graph.forward_flops,
    "formula_flops": gpt_forward_flops(GPTConfig.preset("gpt3-175b"), 1),
    "layers": len(graph.layers),
    "block_kinds": len({graph.layer(f"blocks.{i}").kind for i in range(96)}),
    "tp_divisor": graph.layer("blocks.0").tp_divisor,
}))
"""


@pytest.mark.slow
def test_gpt3_175b_on_meta_traces_quickly_with_exact_params():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["trace_s"] < 30 and r["peak_rss_bytes"] < 2 * 2**30
    assert r["num_params"] == r["numel"] and abs(r["num_params"] - 174.6e9) < 0.05e9
    assert abs(r["forward_flops"] - r["formula_flops"]) <= 0.02 * r["formula_flops"]
    assert r["layers"] == 96 + 4 and r["block_kinds"] == 1 and r["tp_divisor"] == 96
