"""Megatron-LM SC'21 Table 1 (A100-80GB, published layouts, full recompute): predicted iteration times stay
near the published ones. The goal, and what benchmarks/published_runs.py reports over all ten rows, is ±15%;
this test holds three rows (tp = 1, 4, 8) to a generous ±25% so that a term gone wrong (attention left
replicated under TP made the tp = 8 row 1.40×) fails it. Korthikanti et al. 2022 (sequence parallelism and
selective recompute) is held on its 22B model, the only one that traces in seconds."""

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


@pytest.mark.slow
def test_korthikanti_22b_full_recompute_and_sequence_parallel_selective():
    """Korthikanti et al. 2022 (arXiv 2205.05198), 22B model at tp 8: Table 5's iteration time under full
    recompute and under sequence parallelism + selective recompute within ±25%, and Table 4's per-block
    overheads in the published order (full recompute far above selective, sequence parallelism a saving)."""
    data = published_runs.load_2022()
    row = next(r for r in data["table3_configs"] if r["label"] == "22B")
    published = next(r for r in data["table5_iteration_s"]["rows"] if r["label"] == "22B")
    graph = published_runs.trace_2022(row)
    runs = {r["setting"]: r for r in published_runs.predict_2022(row, published, graph)}
    for run in runs.values():
        assert 0.75 <= run["ratio"] <= 1.25, run
    # selective recompute takes its few percent, full recompute a third: the speed-up the paper reports
    speedup = runs["full_recompute"]["predicted_s"] / runs["sp_selective"]["predicted_s"]
    assert 1.15 <= speedup <= 1.45, runs
    layers = {r["experiment"]: r for r in published_runs.predict_layer_2022(
        row, data["table4_layer_22B_ms"]["rows"], graph)}
    assert layers["sequence parallelism"]["predicted_overhead"] < 0
    assert 0.25 <= layers["baseline with full recompute"]["predicted_overhead"] <= 0.5
    assert 0 < layers["selective recompute + sequence parallelism"]["predicted_overhead"] \
        < layers["selective recompute"]["predicted_overhead"] < 0.15
