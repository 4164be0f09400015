"""Executor numerics on real gloo process groups: every layout trains like one process (losses, final state
dict, then forward-only evaluation and, without a pipeline, the outputs of ``pm(inputs)``).

The tests of this module share ONE torchrun world of 4 CPU ranks (a world costs seconds of start-up per rank) that
runs the layouts of every selected test in turn (``-m 'not slow'`` starts it with the quick test's only); the parent
compares every layout's AdamW losses and final full state dict with a single process.
"""

from __future__ import annotations

import re

import pytest
import torch

from distributed_helpers import GPT_CONFIG, all_layouts, layout, reference, run_world, selected_tests

pytestmark = pytest.mark.filterwarnings("ignore")

#: examples/hybrid_layouts.py, run as ``torchrun --nproc_per_node 4`` runs it, in this module's world
EXAMPLE = {"name": "example:hybrid_layouts", "example": "examples/hybrid_layouts.py"}
#: the nested core of every block (``blocks.i.attn.core``), recomputed under dp2×tp2 on the ``gpt-core`` model
CORES = [f"blocks.{i}.attn.core" for i in range(GPT_CONFIG.layers)]


def smoke_cases() -> list[dict]:
    return [
        layout("gpt", "fsdp2xtp2", dp=2, tp=2, data_parallel="fsdp", recompute=True),
        layout("gpt", "dp2xpp2-1f1b", pp=2, dp=2, schedule="1f1b", recompute=True),
        layout("mlp", "pp2xtp2-interleaved", pp=2, tp=2, schedule="interleaved"),
        {"name": "gpt:auto-lazy", "kind": "gpt", "lazy": True, "auto": {"mesh": {"pp": 2, "dp": 2}}},
        {"name": "gpt:auto-pp2xtp2", "kind": "gpt", "auto": {"mesh": {"pp": 2, "tp": 2}}},
        layout("gpt", "dp2xtp2-sequence-parallel", dp=2, tp=2, recompute=True, sequence_parallel=True),
        {"name": "gpt:plan-for-2-ranks", "kind": "gpt", "expect_error": True,
         "plan": dict(stages=[["tok", "pos", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4",
                               "blocks.5", "ln_f", "head"]], dp=2, global_batch_size=16)},
    ]


def nested_core_case() -> dict:
    case = layout("gpt", "dp2xtp2", dp=2, tp=2)
    case["plan"]["recompute"] = CORES
    return {**case, "kind": "gpt-core", "name": "gpt-core:dp2xtp2:recompute-attn.core"}


def _world_cases(selected: set[str]) -> list[dict]:
    cases = smoke_cases() if "test_smoke_hybrid_layouts_planned_and_pinned" in selected else []
    for kind in ("gpt", "mlp"):
        if f"test_every_layout_schedule_and_recompute_matches_one_process[{kind}]" in selected:
            cases += all_layouts(kind)
    if "test_parallelize_recomputes_a_nested_core_on_dp2xtp2_like_one_process" in selected:
        cases.append(nested_core_case())
    unique = {case["name"]: case for case in cases}  # the smoke's mlp pp2×tp2 interleaved is in the MLP's list
    if "test_hybrid_layouts_example_matches_one_process_on_four_ranks" in selected:  # last: it ends the group
        unique[EXAMPLE["name"]] = EXAMPLE
    return list(unique.values())


@pytest.fixture(scope="module")
def world(request, tmp_path_factory) -> dict:
    """{case name: rank 0's result} of one world running the cases of every selected test of this module."""
    cases = _world_cases(selected_tests(request))
    return run_world(cases, tmp_path_factory.mktemp("execute_world"), timeout_s=max(240, 20 * len(cases)))


def check_matches_reference(results: dict, cases: list[dict]) -> None:
    refs = {kind: reference(kind) for kind in {c["kind"] for c in cases}}
    for case in cases:
        got, ref = results[case["name"]], refs[case["kind"]]
        # fp32: float rounding only. Attention's key bias has a true gradient of zero and AdamW scales rounding
        # noise there to a fraction of a step (lr = 1e-3), hence absolute state bounds well under one step.
        # bf16 (against the fp32 reference): bf16 rounding of activations, the same bounds widened.
        fp32 = case["plan"].get("precision", "fp32") == "fp32" if "plan" in case else True
        loss_rel, out_atol, state_atol = (1e-5, 1e-4, 1e-4) if fp32 else (1e-3, 5e-2, 1e-2)
        assert got["losses"] == pytest.approx(ref["losses"], rel=loss_rel), case["name"]
        assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=10 * loss_rel), case["name"]
        if "outputs" in got:  # pm(inputs) where the plan has no pipeline
            assert torch.allclose(got["outputs"].float(), ref["outputs"], atol=out_atol), case["name"]
        assert list(got["state"]) == list(ref["state"]), case["name"]
        if "plan" in case:  # every module the plan names is recomputed, and no other
            assert got["recomputed"] == sorted(case["plan"]["recompute"]), case["name"]
        for key, value in ref["state"].items():
            assert got["state"][key].dtype == value.dtype, (case["name"], key)  # fp32 master weights
            assert torch.allclose(got["state"][key], value, atol=state_atol, rtol=1e-4), (case["name"], key)


def test_smoke_hybrid_layouts_planned_and_pinned(world):
    """A quick world: 2-D and pipelined layouts, a tied weight across stages, an automatic plan planned lazily on
    rank 0 and broadcast, and the mismatch errors under torchrun."""
    cases = smoke_cases()
    results = world
    check_matches_reference(results, cases[:6])
    auto = results["gpt:auto-lazy"]["plan"]
    assert auto["mesh"]["pp"] == 2 and auto["mesh"]["dp"] == 2 and auto["global_batch_size"] == 16
    assert results["gpt:auto-pp2xtp2"]["plan"]["mesh"] == {"pp": 2, "dp": 1, "tp": 2}
    assert results["gpt:dp2xtp2-sequence-parallel:recompute"]["plan"]["sequence_parallel"] is True
    mismatch = results["gpt:plan-for-2-ranks"]
    assert mismatch["error_type"] == "PlanMismatchError"
    assert "needs 2 ranks but this job has 4" in mismatch["message"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt", "mlp"])
def test_every_layout_schedule_and_recompute_matches_one_process(kind, world):
    cases = all_layouts(kind)
    check_matches_reference(world, cases)


@pytest.mark.slow
def test_parallelize_recomputes_a_nested_core_on_dp2xtp2_like_one_process(world):
    """Recompute of a module two levels inside each block (Megatron's ``attn.core``) applied by
    ``autoplan.parallelize`` under tensor parallelism, whose core runs on each rank's heads only."""
    case = nested_core_case()
    assert world[case["name"]]["recomputed"] == sorted(CORES)
    check_matches_reference(world, [case])


@pytest.mark.slow
def test_hybrid_layouts_example_matches_one_process_on_four_ranks(world):
    """The example trains dp2×tp2 and pp2×dp2 as planned and prints each one's distance from one process."""
    out = world[EXAMPLE["name"]]["stdout"]
    diffs = [float(x) for x in re.findall(r"max rel\. diff (\S+)\n", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-5, out
