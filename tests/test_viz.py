"""Plan pictures and the text timeline: schedule orders (against torch.distributed.pipelining's own), block
lengths read from plan.predicted, the figure for every schedule, and the message when matplotlib is missing."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

import autoplan
from autoplan.cli import main
from autoplan.plan import Mesh, ModelInfo, Plan, Predicted, Stage, StageTime
from autoplan.synthetic import pipeline_plan as small_plan
from autoplan.timeline import format_timeline, schedule_order, simulate, timeline

GIB = 2**30


# -- schedule order -----------------------------------------------------------------------------------------------

def _torch_order(schedule: str, pp: int, m: int, v: int) -> list[list[str]]:
    """The compute actions of torch.distributed.pipelining's own schedule IR (``pipeline_order``), per rank."""
    from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    if schedule == "interleaved":
        rounds = max(1, m // pp)
        state = SimpleNamespace(n_local_stages=v, microbatches_per_round=m // rounds, pp_group_size=pp,
                                _n_microbatches=m)
        order = {r: ScheduleInterleaved1F1B._calculate_single_rank_operations(state, r) for r in range(pp)}
    else:
        cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        order = cls._get_pipeline_order(SimpleNamespace(_num_stages=pp, _n_microbatches=m))
    return [[f"{a.computation_type.value}{a.stage_index}.{a.microbatch_index}" for a in order[r]
             if a is not None and a.computation_type.value in ("F", "B")] for r in range(pp)]


@pytest.mark.parametrize("schedule, pp, m, v", [
    ("gpipe", 4, 6, 1), ("1f1b", 4, 4, 1), ("1f1b", 4, 9, 1), ("1f1b", 2, 5, 1),
    ("interleaved", 4, 8, 2), ("interleaved", 2, 4, 3), ("interleaved", 8, 24, 4), ("interleaved", 4, 4, 4),
])
def test_schedule_order_is_torch_pipelinings_order(schedule, pp, m, v):
    ours = [[str(a) for a in rank] for rank in schedule_order(schedule, pp, m, v)]
    theirs = _torch_order(schedule, pp, m, v)
    if schedule == "1f1b":
        # torch's 1F1B IR numbers the last rank's forwards from 1 (it has no warm-up forward to start from); its
        # runtime, like ours, runs microbatch 0 first. The kinds in order and every other rank must agree.
        assert [a[0] for a in ours[-1]] == [a[0] for a in theirs[-1]]
        ours, theirs = ours[:-1], theirs[:-1]
    assert ours == theirs


def test_every_rank_runs_every_forward_and_backward_once():
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 3)):
        order = schedule_order(schedule, 3, 6, v)
        for r, actions in enumerate(order):
            expected = {(kind, k, i) for kind in "FB" for k in range(r, 3 * v, 3) for i in range(6)}
            assert sorted((a.kind, a.stage, a.microbatch) for a in actions) == sorted(expected)


def test_golden_event_order_of_a_small_plan():
    """pp2 × 4 microbatches, interleaved with v = 2: the order each rank runs, as a golden string."""
    order = schedule_order("interleaved", 2, 4, 2)
    assert [" ".join(map(str, rank)) for rank in order] == [
        "F0.0 F0.1 F2.0 F2.1 F0.2 B2.0 F0.3 B2.1 F2.2 B0.0 F2.3 B0.1 B2.2 B2.3 B0.2 B0.3",
        "F1.0 F1.1 F3.0 B3.0 F3.1 B3.1 F1.2 B1.0 F1.3 B1.1 F3.2 B3.2 F3.3 B3.3 B1.2 B1.3",
    ]


def test_bad_schedule_arguments_are_value_errors():
    with pytest.raises(ValueError, match="unknown schedule 'zigzag'"):
        schedule_order("zigzag", 2, 4)
    with pytest.raises(ValueError, match="virtual_stages must be 1"):
        schedule_order("1f1b", 2, 4, 2)
    with pytest.raises(ValueError, match="microbatches must be a positive int, got 0"):
        schedule_order("gpipe", 2, 0)
    with pytest.raises(ValueError, match="waits on itself"):  # rank 0 backward before rank 1 ever ran
        simulate([[schedule_order("gpipe", 2, 1)[0][1]], []], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0])


# -- timeline from plan.predicted -------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
def test_block_lengths_are_the_predicted_figures(schedule):
    plan = small_plan(schedule)
    blocks = timeline(plan)
    stages, ranks = plan.predicted.stages, plan.predicted.ranks
    for b in blocks:
        if b.kind == "forward":
            assert b.duration_s == pytest.approx(stages[b.stage].forward_s + stages[b.stage].comm_s / 2, abs=1e-15)
        elif b.kind == "backward":
            assert b.duration_s == pytest.approx(stages[b.stage].backward_s + stages[b.stage].comm_s / 2, abs=1e-15)
        elif b.kind == "recompute":
            assert b.duration_s == pytest.approx(stages[b.stage].recompute_s, abs=1e-15)
        else:
            assert b.duration_s == pytest.approx(getattr(ranks[b.rank], f"{b.kind}_s"), abs=1e-15)
    # each rank: m × (its stages' total), the two tail blocks, nothing overlapping
    for r in range(2):
        own = sorted((b for b in blocks if b.rank == r), key=lambda b: b.start_s)
        assert all(a.end_s <= b.start_s + 1e-15 for a, b in zip(own, own[1:]))
        busy = sum(b.duration_s for b in own)
        assert busy == pytest.approx(4 * sum(s.total_s for s in stages[r::2]) + ranks[r].dp_sync_s
                                     + ranks[r].optimizer_s)


def test_balanced_1f1b_timeline_ends_at_the_cost_models_step_time():
    """Equal stages: the simulated pipeline takes (m + pp − 1) stage-times, the cost model's formula."""
    plan = small_plan("1f1b")
    same = StageTime(1e-3, 2e-3, 0.0, 0.2e-3)
    predicted = plan.predicted
    plan = plan.replace(predicted=Predicted(predicted.step_time_s, predicted.peak_memory_bytes,
                                            stages=(same, same), ranks=predicted.ranks))
    blocks = timeline(plan)
    pipeline_end = max(b.end_s for b in blocks if b.kind in ("forward", "backward"))
    assert pipeline_end == pytest.approx((4 + 2 - 1) * same.total_s)


def test_the_cost_model_records_figures_that_compose_its_step_time_and_memory():
    from graphs import gpt_like_graph
    from autoplan.cost.plan_cost import estimate

    graph = gpt_like_graph(layers=4, hidden=256, seq=128, vocab=1000)
    names = [layer.name for layer in graph.layers]
    tp = {f"blocks.{i}.{m}": s for i in range(4) for m, s in (("attn.qkv", "colwise"), ("attn.proj", "rowwise"),
                                                               ("mlp.fc", "colwise"), ("mlp.proj", "rowwise"))}
    for schedule, v in (("1f1b", 1), ("interleaved", 2)):
        cuts = [names[:3], names[3:4], names[4:6], names[6:]] if v == 2 else [names[:4], names[4:]]
        plan = Plan(model=ModelInfo("GPTLike", "0" * 16, graph.num_params),
                    cluster=autoplan.Cluster.preset("a100-80gb"), global_batch_size=16, microbatch_size=2,
                    microbatches=4, mesh=Mesh(pp=2, dp=2, tp=2), schedule=schedule, virtual_stages=v,
                    data_parallel="fsdp", stages=tuple(Stage(tuple(c), ("blocks.1",) if "blocks.1" in c else ())
                                                       for c in cuts), tensor_parallel=tp, precision="bf16")
        p = estimate(graph, plan)
        assert len(p.stages) == len(plan.stages) and len(p.ranks) == plan.mesh.pp
        assert [p.ranks[k % 2].peak_bytes for k in range(len(plan.stages))] == list(p.peak_memory_bytes)
        assert [s.recompute_s > 0 for s in p.stages] == [bool(stage.recompute) for stage in plan.stages]
        slowest = max(sum(s.total_s for s in p.stages[r::2]) for r in range(2))
        tail = max(r.dp_sync_s + r.optimizer_s for r in p.ranks)
        bubble = (2 - 1) * max(s.total_s for s in p.stages)
        assert plan.microbatches * slowest + bubble + tail == pytest.approx(p.step_time_s, rel=1e-9)
        plan = plan.replace(predicted=p)
        again = Plan.from_dict(plan.to_dict())
        assert again.predicted == p and timeline(again) == timeline(plan)


def test_a_plan_without_per_stage_figures_says_how_to_get_them():
    plan = small_plan().replace(predicted=Predicted(1.0, (GIB, GIB)))
    with pytest.raises(ValueError, match="no per-stage times .* re-plan"):
        timeline(plan)
    with pytest.raises(ValueError, match="the plan has no prediction to draw a timeline from"):
        timeline(plan.replace(predicted=None))
    predicted = small_plan().predicted
    short = Predicted(1.0, (GIB, GIB), stages=predicted.stages[:1], ranks=predicted.ranks)
    with pytest.raises(ValueError, match="1 stage times and 2 rank figures but the plan has 2 stages"):
        timeline(plan.replace(predicted=short))
    assert "Timeline" not in plan.explain()


# -- text --------------------------------------------------------------------------------------------------------

def test_explain_shows_one_timeline_line_per_rank():
    text = small_plan("1f1b").explain()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Timeline"))
    rows = [line for line in lines[start + 1:start + 3]]
    assert [row.split()[:2] for row in rows] == [["rank", "0"], ["rank", "1"]]
    assert all(set(row.split()[2]) <= set("FBrsox·") for row in rows)
    assert rows[1].split()[2].startswith("·")  # rank 1 waits for rank 0's first forward: the fill bubble


def test_format_timeline_golden():
    """1F1B, pp2, 2 microbatches; forward 1 s, backward 2 s, stage 1 recomputes for 1 s; rank 0 then syncs (1 s)
    and steps (1 s): 13 s, one column per second."""
    blocks = simulate(schedule_order("1f1b", 2, 2), [1.0, 1.0], [2.0, 2.0], [0.0, 1.0], [(1.0, 1.0), (0.0, 0.0)])
    assert format_timeline(blocks, width=13) == [
        "rank 0  FF···BB··BBso",
        "rank 1  ·FrBBFrBB····",
        "        0 s   13.00 s",
    ]


# -- pictures ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
def test_figure_for_every_schedule_draws_the_predicted_blocks(schedule, tmp_path):
    pytest.importorskip("matplotlib")
    from autoplan.viz import figure

    plan = small_plan(schedule)
    fig = figure(plan)
    top, bottom = fig.axes
    widths = sorted(round(path.vertices[:, 0].max() - path.vertices[:, 0].min(), 9)
                    for coll in top.collections for path in coll.get_paths())
    expected = sorted(round(b.duration_s * 1e3, 9) for b in timeline(plan) if b.duration_s > 0)  # ms axis
    assert widths == expected
    stacked = [sum(patch.get_width() for patch in bottom.patches if abs(patch.get_y() + 0.35 - r) < 1e-9)
               for r in range(2)]
    assert stacked == pytest.approx([rank.peak_bytes / GIB for rank in plan.predicted.ranks])
    if schedule == "interleaved":  # the files: once (drawing is the slow part)
        for suffix in (".png", ".svg"):
            path = plan.draw(tmp_path / f"plan{suffix}")
            assert path.stat().st_size > 5000
            assert path.read_bytes()[:4] == b"\x89PNG" if suffix == ".png" else b"<svg" in path.read_bytes()[:2000]


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    with pytest.raises(ImportError, match=r"pip install 'autoplan\[viz\]'"):
        small_plan().draw(tmp_path / "plan.png")
    assert not (tmp_path / "plan.png").exists()


def test_draw_refuses_an_unknown_format(tmp_path):
    with pytest.raises(ValueError, match=r"must end in one of \('.png', '.svg', '.pdf'\)"):
        small_plan().draw(tmp_path / "plan.jpg")


def test_cli_show_picture(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    small_plan("interleaved").save(tmp_path / "plan.json")
    assert main(["show", str(tmp_path / "plan.json"), "--picture", str(tmp_path / "plan.svg")]) == 0
    assert (tmp_path / "plan.svg").stat().st_size > 5000
    assert f"picture written to {tmp_path / 'plan.svg'}" in capsys.readouterr().out
    assert main(["show", str(tmp_path / "plan.json"), "--picture", str(tmp_path / "plan.gif")]) == 2
    captured = capsys.readouterr()
    assert "must end in one of" in captured.err and captured.out == ""  # refused before anything is printed
    # `autoplan plan` refuses the picture before its search, and says how to get matplotlib
    assert main(["plan", "autoplan.models:gpt_debug", "--picture", str(tmp_path / "plan.jpg")]) == 2
    assert "--picture" in capsys.readouterr().err


def test_cli_names_the_extra_when_matplotlib_is_missing(monkeypatch, tmp_path, capsys):
    small_plan().save(tmp_path / "plan.json")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["show", str(tmp_path / "plan.json"), "--picture", str(tmp_path / "plan.png")]) == 2
    assert "pip install 'autoplan[viz]'" in capsys.readouterr().err
