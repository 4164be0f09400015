"""Plan JSON v1: golden file, round trip, and load errors that name the cause."""

import json
from pathlib import Path

import pytest

from autoplan.cluster import Cluster, Device
from autoplan.errors import PlanMismatchError
from autoplan.plan import Alternative, Mesh, ModelInfo, Plan, Predicted, SearchInfo, Stage

GOLDEN = Path(__file__).parent / "golden" / "plan_v1.json"


def golden_plan() -> Plan:
    blocks = [f"blocks.{i}" for i in range(4)]
    return Plan(
        model=ModelInfo("GPT", "0123456789abcdef", 151_000_000, tokens_per_sample=1024),
        cluster=Cluster(nodes=2, devices_per_node=8, name="golden", device=Device(
            "A100-SXM4-80GB", 80 * 2**30, {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12}, 0.5, 2 * 2**30,
            2.039e12)),
        global_batch_size=64, microbatch_size=2, microbatches=8, mesh=Mesh(pp=2, dp=4, tp=2),
        schedule="1f1b", data_parallel="fsdp", precision="bf16", optimizer="adamw",
        stages=(Stage(("tok", "pos", *blocks[:2]), ("blocks.0",)), Stage((*blocks[2:], "ln_f", "head"))),
        tensor_parallel={f"blocks.{i}.{m}": s for i in range(4)
                         for m, s in (("attn.qkv", "colwise"), ("attn.proj", "rowwise"))},
        predicted=Predicted(step_time_s=1.25, peak_memory_bytes=(40 * 2**30, 30 * 2**30), compute_s=1.0,
                            comm_s=0.1, bubble_s=0.125, recompute_s=0.02, optimizer_s=0.005, samples_per_s=51.2),
        search=SearchInfo(solver="cp-sat", status="OPTIMAL", wall_s=0.5, candidates=120, gap=0.0, alternatives=(
            Alternative("pp1×dp8×tp2 1f1b mb=1×8 ddp", None, "needs 91.20 GiB > 78.00 GiB per device"),
            Alternative("pp4×dp2×tp2 1f1b mb=2×16 fsdp", 1.4, "+12.0% step time (bubble +150.0 ms)"),
        )),
    )


def test_golden_file_matches_the_v1_form():
    assert json.loads(GOLDEN.read_text()) == golden_plan().to_dict()
    assert Plan.load(GOLDEN) == golden_plan()


def test_round_trip_through_a_file(tmp_path):
    path = tmp_path / "plan.json"
    golden_plan().save(path)
    assert Plan.load(path) == golden_plan()
    assert Plan.from_dict(golden_plan().to_dict()).to_dict() == golden_plan().to_dict()


def test_other_version_is_a_plan_mismatch():
    data = golden_plan().to_dict()
    data["autoplan_plan"] = 2
    with pytest.raises(PlanMismatchError, match="version 2"):
        Plan.from_dict(data)


@pytest.mark.parametrize("change, match", [
    (lambda d: d.pop("mesh"), "missing keys \\['mesh'\\]"),
    (lambda d: d.update(schedule="zigzag"), "schedule must be one of"),
    (lambda d: d["mesh"].update(tp=4), "has 2×4×4 = 32 devices but the cluster has 16"),
    (lambda d: d.update(microbatches=3), "must equal global_batch_size 64"),
    (lambda d: d["stages"][1]["layers"].append("blocks.0"), "appears in two stages"),
    (lambda d: d["tensor_parallel"].update({"head": "diagonal"}), "styles are"),
    (lambda d: d["model"].update(extra=1), "'model' has unknown keys \\['extra'\\]"),
])
def test_bad_values_are_value_errors_naming_the_field(change, match):
    data = golden_plan().to_dict()
    change(data)
    with pytest.raises(ValueError, match=match):
        Plan.from_dict(data)


def test_not_json_is_a_value_error(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Plan.load(path)
