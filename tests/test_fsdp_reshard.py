"""FSDP between microbatches as a planner choice (``Plan.fsdp_reshard``): keep the gathered weights through the
step, or reshard every microbatch (ZeRO-3 with gradient accumulation). What each costs, the plan field's JSON and
validation, and the search choosing resharding exactly where keeping does not fit. The executor's collectives and
numerics under it are checked in tests/test_collective_counts.py."""

from __future__ import annotations

import pytest

import autoplan
from autoplan.cost import data_parallel_collectives, fsdp_held_bytes_per_param, fsdp_keeps_weights
from autoplan.cost.plan_cost import Strategy, estimate, fsdp_gather_bytes, rank_state_bytes, rank_tail_s
from autoplan.options import PlanOptions
from autoplan.plan import Mesh, ModelInfo, Plan, Stage
from autoplan.solve import search
from autoplan.solve.space import enumerate_strategies
from autoplan.synthetic import gpt_like_graph


def _fsdp(microbatches: int, reshard: str, pp: int = 1) -> Strategy:
    return Strategy(pp, 8, 1, 1, microbatches, "1f1b", "fsdp", precision="bf16", fsdp_reshard=reshard)


def test_resharding_per_microbatch_gathers_twice_and_scatters_once_per_microbatch_and_holds_nothing():
    counts = {reshard: [(c.kind, c.count) for c in data_parallel_collectives(
        1000, dp=8, data_parallel="fsdp", precision="bf16", microbatches=4, reshard=reshard)]
        for reshard in ("step", "microbatch")}
    assert counts == {"step": [("all_gather", 1), ("reduce_scatter", 1)],
                      "microbatch": [("all_gather", 8), ("reduce_scatter", 4)]}
    # one microbatch without a pipeline: the two are the same ZeRO-3 step
    assert (data_parallel_collectives(1000, dp=8, data_parallel="fsdp", precision="bf16", reshard="microbatch")
            == data_parallel_collectives(1000, dp=8, data_parallel="fsdp", precision="bf16"))
    assert fsdp_keeps_weights(4, 1) and not fsdp_keeps_weights(4, 1, "microbatch")
    assert fsdp_held_bytes_per_param("bf16", "fsdp", 8, 4, 1) == 6
    assert fsdp_held_bytes_per_param("bf16", "fsdp", 8, 4, 1, "microbatch") == 0


def test_resharding_is_slower_and_leaner_than_keeping():
    keep, reshard = _fsdp(4, "step"), _fsdp(4, "microbatch")
    cluster, params = autoplan.Cluster.preset("a100-80gb"), 10**9
    assert rank_tail_s(reshard, cluster, params)[0] > rank_tail_s(keep, cluster, params)[0]
    # 16/8 bytes of sharded states per parameter, and the 6 held bytes only when keeping
    assert rank_state_bytes(keep, params) - rank_state_bytes(reshard, params) == 6 * params
    # the layer in flight: its gathered bf16 weights, plus its unsharded gradients when nothing is held
    assert fsdp_gather_bytes(reshard, 1000) == 4000 and fsdp_gather_bytes(keep, 1000) == 2000


def test_pipelines_and_ddp_cannot_reshard_per_microbatch():
    with pytest.raises(ValueError, match="needs pp = 1"):
        fsdp_keeps_weights(4, 2, "microbatch")
    with pytest.raises(ValueError, match="fsdp_reshard must be one of"):
        fsdp_keeps_weights(4, 1, "layer")
    plan = _plan("microbatch")
    with pytest.raises(ValueError, match="applies to FSDP only"):
        plan.replace(data_parallel="ddp")
    with pytest.raises(ValueError, match="needs pp = 1"):
        plan.replace(mesh=Mesh(pp=2, dp=4), stages=(Stage(("a",)), Stage(("b",))), microbatches=8,
                     microbatch_size=2)


def _plan(reshard: str) -> Plan:
    return Plan(model=ModelInfo("M", "0" * 16, 0), cluster=autoplan.Cluster.preset("a100-80gb"),
                global_batch_size=64, microbatch_size=2, microbatches=4, mesh=Mesh(dp=8), schedule="1f1b",
                data_parallel="fsdp", stages=(Stage(("a", "b")),), fsdp_reshard=reshard)


def test_plan_json_carries_the_choice_only_when_it_is_made():
    kept, resharded = _plan("step"), _plan("microbatch")
    assert "fsdp_reshard" not in kept.to_dict()  # plans written before the choice existed read the same
    assert resharded.to_dict()["fsdp_reshard"] == "microbatch"
    assert Plan.from_dict(resharded.to_dict()) == resharded and Plan.from_dict(kept.to_dict()) == kept
    assert kept.fsdp_keeps_weights and not resharded.fsdp_keeps_weights
    data = resharded.to_dict()
    data["fsdp_reshard"] = True
    with pytest.raises(ValueError, match="'fsdp_reshard' must be a string"):
        Plan.from_dict(data)
    assert "resharded every microbatch" in str(resharded) and "kept through the step" in str(kept)


def test_search_offers_resharding_only_for_fsdp_with_several_microbatches_and_no_pipeline():
    graph = gpt_like_graph(layers=4, hidden=256, seq=128, vocab=1000)
    strategies = enumerate_strategies(graph, autoplan.Cluster.preset("a100-80gb"), PlanOptions(global_batch_size=32))
    resharded = [s for s in strategies if s.fsdp_reshard == "microbatch"]
    assert resharded and all(s.data_parallel == "fsdp" and s.pp == 1 and s.dp > 1 and s.microbatches > 1
                             for s in resharded)
    twins = {(s.dp, s.tp, s.microbatch_size, s.sequence_parallel) for s in strategies
             if s.data_parallel == "fsdp" and s.pp == 1 and s.microbatches > 1}
    assert len(resharded) == len(twins)


@pytest.mark.parametrize("data_parallel", ["fsdp", "auto"])
def test_planner_reshards_per_microbatch_where_keeping_does_not_fit(data_parallel):
    """13B parameters over dp = 8 in bf16 with 4 microbatches: keeping holds 6 more bytes per parameter unsharded
    (79 GB beside the 26 GB of sharded states) and cannot fit an 80 GB device at any recompute; resharding can. A
    small model keeps its weights, which is faster."""
    options = PlanOptions(global_batch_size=32, microbatch_size=1, mesh={"pp": 1, "tp": 1}, precision="bf16",
                          data_parallel=data_parallel)
    cluster = autoplan.Cluster.preset("a100-80gb")
    big = gpt_like_graph(layers=16, hidden=8192, seq=2048, heads=64, vocab=32000)
    plan = search(big, cluster, options)
    assert (plan.data_parallel, plan.microbatches, plan.fsdp_reshard) == ("fsdp", 4, "microbatch")
    assert max(plan.predicted.peak_memory_bytes) <= cluster.device.usable_memory_bytes
    kept = estimate(big, plan.replace(fsdp_reshard="step", predicted=None))
    assert max(kept.peak_memory_bytes) > cluster.device.usable_memory_bytes
    assert kept.step_time_s < plan.predicted.step_time_s  # what resharding costs: its collectives
    assert estimate(big, plan).step_time_s == pytest.approx(plan.predicted.step_time_s, rel=1e-12)

    small = gpt_like_graph(layers=4, hidden=1024, seq=2048, heads=16, vocab=32000)
    plan = search(small, cluster, options)
    assert plan.data_parallel == "fsdp" and plan.fsdp_reshard == "step"


def test_pinned_choice_is_honoured_and_refused_where_it_cannot_run():
    """``fsdp_reshard="step"`` never reshards (the 13B model above then has no layout at pp = tp = 1);
    ``"microbatch"`` reshards wherever it plans FSDP, even for a model that would be faster keeping."""
    cluster = autoplan.Cluster.preset("a100-80gb")
    pins = dict(global_batch_size=32, microbatch_size=1, mesh={"pp": 1, "tp": 1}, precision="bf16")
    big = gpt_like_graph(layers=16, hidden=8192, seq=2048, heads=64, vocab=32000)
    with pytest.raises(autoplan.InfeasiblePlanError):
        search(big, cluster, PlanOptions(**pins, fsdp_reshard="step"))
    small = gpt_like_graph(layers=4, hidden=1024, seq=2048, heads=16, vocab=32000)
    plan = search(small, cluster, PlanOptions(**pins, fsdp_reshard="microbatch"))
    assert (plan.data_parallel, plan.fsdp_reshard) == ("fsdp", "microbatch")
    with pytest.raises(ValueError, match="fsdp_reshard='microbatch' reshards FSDP's weights between microbatches"):
        PlanOptions(data_parallel="ddp", fsdp_reshard="microbatch")
    with pytest.raises(ValueError, match="needs FSDP and no pipeline"):
        PlanOptions(mesh={"pp": 2}, fsdp_reshard="microbatch")
    with pytest.raises(ValueError, match="fsdp_reshard='layer' is not one of"):
        PlanOptions(fsdp_reshard="layer")
    with pytest.raises(ValueError, match="fsdp_reshard='microbatch' needs FSDP over dp > 1"):
        search(small, autoplan.Cluster.preset("a100-80gb", devices_per_node=1), PlanOptions(fsdp_reshard="microbatch"))
