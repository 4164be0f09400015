"""Megatron-LM SC'21 Table 1 (A100-80GB, published layouts, full recompute): predicted iteration times stay
near the published ones. The goal, and what benchmarks/published_runs.py reports over all ten rows, is ±15%;
this test holds three rows (tp = 1, 4, 8) to a generous ±25% so that a term gone wrong (attention left
replicated under TP made the tp = 8 row 1.40×) fails it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import published_runs  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("label", ["1.7B", "7.5B", "18B"])
def test_published_iteration_time_within_a_generous_margin(label):
    row = next(r for r in published_runs.load_rows() if r["label"] == label)
    result = published_runs.predict_row(row)
    assert 0.75 <= result["ratio"] <= 1.25, result
