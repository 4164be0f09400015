"""Executor numerics on real gloo process groups: every layout trains like one process (losses, final state
dict, then forward-only evaluation and, without a pipeline, the outputs of ``pm(inputs)``).

Each test launches ONE torchrun world of 4 CPU ranks that runs many layouts in turn (a world costs seconds of
start-up); the parent compares every layout's three AdamW losses and final full state dict with a single process.
"""

from __future__ import annotations

import pytest
import torch

from distributed_helpers import all_layouts, layout, reference, run_world

pytestmark = pytest.mark.filterwarnings("ignore")


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
        for key, value in ref["state"].items():
            assert got["state"][key].dtype == value.dtype, (case["name"], key)  # fp32 master weights
            assert torch.allclose(got["state"][key], value, atol=state_atol, rtol=1e-4), (case["name"], key)


def test_smoke_hybrid_layouts_planned_and_pinned(tmp_path):
    """A quick world: 2-D and pipelined layouts, a tied weight across stages, an automatic plan planned lazily on
    rank 0 and broadcast, and the mismatch errors under torchrun."""
    cases = [
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
    results = run_world(cases, tmp_path)
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
def test_every_layout_schedule_and_recompute_matches_one_process(kind, tmp_path):
    cases = all_layouts(kind)
    check_matches_reference(run_world(cases, tmp_path, timeout_s=420), cases)
