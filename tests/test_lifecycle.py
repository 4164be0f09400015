"""Train what you plan, on real gloo process groups: models built on meta (each rank allocates its part and every
layout initializes alike), full and safetensors loading, checkpoints resumed under another layout and world size
(losses and weights equal to one process training throughout), and the guards that turn hangs and silent mistakes
into errors."""

from __future__ import annotations

import pytest
import torch

import autoplan
from autoplan.execute.manual import manual_plan
from autoplan.models import GPT
from distributed_helpers import GPT_CONFIG, LR, build_model, layout
from lifecycle_helpers import SAVE_AT, lifecycle_batches, lifecycle_reference, run_lifecycle_world, train_reference

pytestmark = pytest.mark.filterwarnings("ignore")


def _plan(name: str, **kw) -> dict:
    return layout("gpt", name, **kw)["plan"]


def _assert_states_close(got: dict, want: dict, what: str) -> None:
    assert list(got) == list(want), what
    for key, value in want.items():
        assert torch.allclose(got[key], value, atol=1e-4, rtol=1e-4), (what, key)


def _meta_reference(seed: int = 7) -> dict:
    """The initial weights of a meta GPT parallelized in a world of one under ``torch.manual_seed(seed)``."""
    with torch.device("meta"):
        model = GPT(GPT_CONFIG)
    torch.manual_seed(seed)
    pm = autoplan.parallelize(model, plan=manual_plan(model, **_plan("one")))
    return pm.full_state_dict()


RESUME_PAIRS = [
    ("fsdp4>dp2xpp2", _plan("fsdp4", dp=4, data_parallel="fsdp"), _plan("dp2xpp2", pp=2, dp=2)),
    ("dp2xpp2>dp2xtp2", _plan("dp2xpp2", pp=2, dp=2), _plan("dp2xtp2", dp=2, tp=2)),
    ("dp2xtp2>pp4-interleaved", _plan("dp2xtp2", dp=2, tp=2), _plan("pp4i", pp=4, schedule="interleaved")),
    ("pp4-interleaved>dp4", _plan("pp4i", pp=4, schedule="interleaved"), _plan("dp4", dp=4)),
]


def _check_resume(results: dict, name: str, reference: tuple[list[float], dict]) -> None:
    losses, state = reference
    got = results[name]
    assert got["extra"] == {"step": SAVE_AT}
    assert got["losses"] == pytest.approx(losses, rel=1e-5), name
    _assert_states_close(got["state"], state, name)


LAYOUTS = {"dp2xtp2": _plan("dp2xtp2", dp=2, tp=2),
           "fsdp2xpp2": _plan("fsdp2xpp2", pp=2, dp=2, data_parallel="fsdp")}


def _meta_cases(keys: list[str]) -> list[dict]:
    return [{"name": f"meta:{k}", "action": "meta_init", "plan": LAYOUTS[k]} for k in keys]


def _check_meta(results: dict, keys: list[str]) -> None:
    """Initial weights bit for bit those of a world of one (same seed on rank 0, other ranks' seeds ignored);
    then SAVE_AT steps like one process from those weights."""
    init = _meta_reference()
    assert torch.equal(init["tok.weight"], init["head.weight"])  # still tied
    model = build_model("gpt")
    model.load_state_dict(init)
    losses, state = train_reference(model, lifecycle_batches()[:SAVE_AT])
    for key in keys:
        got = results[f"meta:{key}"]
        for k, v in init.items():
            assert torch.equal(got["init"][k], v), (key, k)
        assert got["losses"] == pytest.approx(losses, rel=1e-5), key
        _assert_states_close(got["state"], state, key)


def _check_guards(ranks: list[dict]) -> None:
    for rank, results in enumerate(ranks):
        g = results["guards"]
        assert g["twice"].startswith("ValueError: the model was already parallelized by autoplan"), g["twice"]
        assert g["stale_optimizer"].startswith("ValueError: this optimizer holds parameter"), g["stale_optimizer"]
        assert "batch normalization" in g["batch_norm"] and "SyncBatchNorm" in g["batch_norm"], g["batch_norm"]
        assert g["ddp_unused"].startswith("ValueError: parameters ['spare.weight', 'spare.bias'] got no gradient")
        assert g["fsdp_unused"] is None, g["fsdp_unused"]
        error = results["fail"]["error"]  # rank 3's loss raised mid-pipeline: every rank raises its error, promptly
        assert error is not None and error.startswith("ValueError") and "the loss of this rank is broken" in error
        if rank != 3:
            assert "rank 3 failed during train_step" in error, error
        assert results["fail"]["seconds"] < 20, results["fail"]
    assert ranks[0]["guards"]["seeds_agree"] is True


def test_meta_init_resume_loading_and_guards(tmp_path):
    """One world of 4 ranks: meta init under fsdp2×pp2, fsdp4 → dp2×pp2 resume, full-state and safetensors
    loading, the guards, and last one rank failing mid-step; then the 4-rank checkpoint resumed by one process."""
    name, a, b = RESUME_PAIRS[0]
    cases = _meta_cases(["fsdp2xpp2"]) + [
        {"name": name, "action": "resume", "a": a, "b": b, "dir": str(tmp_path)},
        {"name": "load", "action": "load_full", "a": LAYOUTS["dp2xtp2"], "b": LAYOUTS["fsdp2xpp2"],
         "dir": str(tmp_path)},
        {"name": "guards", "action": "guards", "plan": _plan("fsdp2xtp2", dp=2, tp=2, data_parallel="fsdp")},
        {"name": "fail", "action": "fail_together", "failing_rank": 3, "plan": _plan("pp4", pp=4)},
    ]
    ranks = run_lifecycle_world(cases, tmp_path)
    results = ranks[0]
    _check_meta(results, ["fsdp2xpp2"])
    reference = lifecycle_reference()
    _check_resume(results, name, reference)
    full = build_model("gpt").state_dict()
    for how in ("rank0", "safetensors", "everywhere"):
        _assert_states_close(results["load"][how], full, how)
    _check_guards(ranks)

    # the checkpoint saved by 4 ranks under fsdp4 after SAVE_AT steps, resumed by one process
    with torch.device("meta"):
        meta = GPT(GPT_CONFIG)
    pm = autoplan.parallelize(meta, plan=manual_plan(meta, **_plan("one")), init_weights=False)
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    assert pm.load_checkpoint(tmp_path / name.replace(":", "_"), optimizer=opt) == {"step": SAVE_AT}
    losses = []
    for inputs, targets in lifecycle_batches()[SAVE_AT:]:
        losses.append(pm.train_step(inputs, targets))
        opt.step()
        opt.zero_grad()
    assert losses == pytest.approx(reference[0][SAVE_AT:], rel=1e-5)
    _assert_states_close(pm.full_state_dict(), reference[1], "world of one")


@pytest.mark.slow
def test_resume_across_every_axis(tmp_path):
    """dp2×pp2 → dp2×tp2 → pp4-interleaved (two stages per rank) → dp4, each a fresh meta model loading the
    checkpoint of the one before; meta init under dp2×tp2; last, one rank failing while the plan is applied."""
    cases = _meta_cases(["dp2xtp2"])
    cases += [{"name": n, "action": "resume", "a": a, "b": b, "dir": str(tmp_path)} for n, a, b in RESUME_PAIRS[1:]]
    cases.append({"name": "fail-in-apply", "action": "fail_in_apply", "failing_rank": 2, "plan": LAYOUTS["dp2xtp2"]})
    ranks = run_lifecycle_world(cases, tmp_path, timeout_s=420)
    for rank, got in enumerate(ranks):
        error = got["fail-in-apply"]["error"]
        assert error is not None and error.startswith("ValueError") and "cannot initialize LayerNorm" in error
        if rank != 2:
            assert "rank 2 failed during autoplan.parallelize" in error, error
        assert got["fail-in-apply"]["seconds"] < 30, got["fail-in-apply"]
    results = ranks[0]
    _check_meta(results, ["dp2xtp2"])
    reference = lifecycle_reference()
    for name, _, _ in RESUME_PAIRS[1:]:
        _check_resume(results, name, reference)
