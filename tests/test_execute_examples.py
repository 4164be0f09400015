"""The executor examples run as their docstrings say (slow: each starts torch in fresh processes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from distributed_helpers import REPO

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run(args: list[str], timeout_s: int = 180) -> str:
    proc = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_quickstart_trains_in_one_process():
    out = run([sys.executable, "examples/quickstart.py"])
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
    assert "mesh" in out and len(losses) == 3 and losses[-1] < losses[0]


def test_hybrid_layouts_match_one_process_on_four_ranks():
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
               "examples/hybrid_layouts.py"])
    diffs = [float(x) for x in re.findall(r"max rel\. diff (\S+)\n", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-5, out
