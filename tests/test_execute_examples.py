"""The executor examples run as their docstrings say (slow: each starts torch in fresh processes). The 4-rank
examples/hybrid_layouts.py runs in tests/test_execute_distributed.py's world (one start-up fewer)."""

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
