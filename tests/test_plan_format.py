"""print(plan) and plan.explain(): readable, complete, pure strings."""

from autoplan.cluster import Cluster
from autoplan.explain import compress_names, explain_plan, format_plan
from autoplan.options import PlanOptions
from autoplan.solve import search

from graphs import gpt_like_graph
from test_plan_json import golden_plan


def test_compress_names_folds_numbered_runs():
    assert compress_names(["tok", "pos", "blocks.0", "blocks.1", "blocks.2", "ln_f"]) == "tok, pos, blocks.0–blocks.2, ln_f"
    assert compress_names(["blocks.0", "blocks.1"]) == "blocks.0, blocks.1"
    assert compress_names(["blocks.3.attn", "blocks.4.attn"]) == "blocks.3.attn, blocks.4.attn"
    assert compress_names([f"blocks.{i}.attn" for i in range(3, 9)]) == "blocks.3.attn–blocks.8.attn"
    assert compress_names(["blocks.1.attn", "blocks.2.mlp", "blocks.3.attn"]) == \
        "blocks.1.attn, blocks.2.mlp, blocks.3.attn"
    assert compress_names([]) == ""


def test_format_plan_shows_mesh_stages_memory_time_and_search():
    text = format_plan(golden_plan())
    assert text == str(golden_plan())
    lines = text.splitlines()
    assert lines[0] == "GPT (151.00M params) on 16 × A100-SXM4-80GB (2 nodes × 8)"
    assert "pp2 × dp4 × tp2" in text and "1f1b; 8 microbatches of 2 (global batch 64)" in text
    assert "FSDP, bf16, adamw" in text and "8 modules (4 colwise, 4 rowwise)" in text
    assert any(l.split()[:2] == ["0", "0"] and "tok, pos, blocks.0, blocks.1 (4)" in l and l.endswith("blocks.0")
               for l in lines)
    assert any("rank 0" in l and "40.00 GiB" in l and "51%" in l for l in lines)
    assert "predicted step  1.25 s = compute 1.00 s + comm 100.0 ms + bubble 125.0 ms" in text
    assert "51.2 samples/s" in text and "52,429 tokens/s" in text
    assert lines[-1] == "search          cp-sat OPTIMAL in 500.0 ms over 120 candidate strategies"


def test_explain_lists_cost_split_and_alternatives():
    text = explain_plan(golden_plan())
    assert text.splitlines()[0] == "Chosen: pp2×dp4×tp2 1f1b mb=2×8 fsdp, predicted 1.25 s per step (51.2 samples/s)"
    rows = {line.split()[0]: line.split()[1:4] for line in text.splitlines()[2:7]}
    assert rows["compute"] == ["1.00", "s", "80.0%"] and rows["bubble"] == ["125.0", "ms", "10.0%"]
    assert "pp1×dp8×tp2 1f1b mb=1×8 ddp" in text and "does not fit" in text and "91.20 GiB > 78.00 GiB" in text
    assert text.splitlines()[-1].split()[-8:] == ["1.40", "s", "+12.0%", "step", "time", "(bubble", "+150.0", "ms)"]


def test_long_pipelines_are_elided_and_real_plans_format():
    graph = gpt_like_graph(layers=24, hidden=256, seq=128, heads=4, vocab=1000)
    plan = search(graph, Cluster.preset("a100-80gb", nodes=2), PlanOptions(global_batch_size=32, mesh={"pp": 16}))
    text = str(plan)
    assert "more stages" in text and len(text.splitlines()) < 45
    assert "worst: rank" in text
    assert "Alternatives" in plan.explain()


def test_format_seconds_shows_an_exact_zero_as_zero():
    from autoplan.explain import format_seconds

    assert format_seconds(0.0) == "0 s" and format_seconds(0) == "0 s"
    assert format_seconds(4e-8) == "0.0 µs"  # a tiny time stays a time: only nothing reads "0 s"


def _interleaved_with_recompute_on_rank_0():
    from autoplan.plan import Predicted, Stage

    base = golden_plan()
    names = base.layers
    stages = (Stage(names[:2], (names[1],)), Stage(names[2:3]), Stage(names[3:5]), Stage(names[5:]))
    predicted = Predicted(step_time_s=1.0, peak_memory_bytes=(70 * 2**30, 50 * 2**30, 70 * 2**30, 50 * 2**30),
                          compute_s=0.9, bubble_s=0.1, recompute_s=0.0)
    return base.replace(schedule="interleaved", virtual_stages=2, stages=stages, predicted=predicted)


def test_memory_rows_are_per_rank_with_the_stages_each_runs():
    plan = _interleaved_with_recompute_on_rank_0()
    assert len(plan.predicted.peak_memory_bytes) == len(plan.stages)  # the JSON: one entry per stage
    rows = [l for l in str(plan).splitlines() if l.strip().startswith("rank ")]
    assert [r.split("  ")[1].strip() for r in rows] == ["rank 0 (stages 0, 2)", "rank 1 (stages 1, 3)"]
    assert "70.00 GiB" in rows[0] and "50.00 GiB" in rows[1]
    assert "recompute 0 s" in str(plan)


def test_explain_says_why_recompute_off_the_slowest_rank_costs_nothing():
    text = explain_plan(_interleaved_with_recompute_on_rank_0())
    (line,) = [l for l in text.splitlines() if l.strip().startswith("recompute")]
    assert line.split()[1:3] == ["0", "s"]
    assert "off the critical path: the 1 recomputed module runs on rank 0, not the slowest rank" in line
