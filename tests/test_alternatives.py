"""``plan.search.alternatives`` lists the chosen FSDP layout's twin with the other ``fsdp_reshard`` (keep the gathered
weights through the step, or reshard every microbatch) where both can run: FSDP over dp > 1, no pipeline, several
microbatches, and the mode not pinned."""

from __future__ import annotations

import pytest

import autoplan
from autoplan.options import PlanOptions
from autoplan.solve import search
from autoplan.synthetic import gpt_like_graph

A100_40 = autoplan.Cluster.preset("a100-40gb")


def _plan(layers=8, hidden=4096, **options):
    graph = gpt_like_graph(layers=layers, hidden=hidden, seq=256, vocab=8000)
    pins = dict(global_batch_size=32, mesh={"pp": 1, "tp": 1}, data_parallel="fsdp", microbatch_size=1)
    return search(graph, A100_40, PlanOptions(**{**pins, **options}))


def _twins(plan) -> list:
    return [a for a in plan.search.alternatives if "fsdp_reshard=" in a.description]


def test_the_kept_weights_plan_lists_its_resharding_twin_priced_as_if_pinned():
    plan = _plan()
    assert (plan.data_parallel, plan.fsdp_reshard, plan.microbatches) == ("fsdp", "step", 4)
    [twin] = _twins(plan)
    assert twin.description == "pp1×dp8×tp1 1f1b mb=1×4 fsdp reshard/mb, fsdp_reshard='microbatch'"
    pinned = _plan(fsdp_reshard="microbatch")
    assert twin.step_time_s == pytest.approx(pinned.predicted.step_time_s, rel=1e-9)
    assert twin.step_time_s > plan.predicted.step_time_s and twin.reason.startswith("+")
    assert "comm" in twin.reason  # 2 all-gathers and 1 reduce-scatter per unit and microbatch, not per step
    assert "fsdp_reshard='microbatch'" in plan.explain()


def test_the_resharding_plan_lists_its_twin_that_does_not_fit():
    plan = _plan(layers=24, hidden=6144)
    assert plan.fsdp_reshard == "microbatch"
    [twin] = _twins(plan)
    assert twin.description == "pp1×dp8×tp1 1f1b mb=1×4 fsdp, fsdp_reshard='step'"
    assert twin.step_time_s is None and twin.reason.startswith("needs ") and "per device" in twin.reason


@pytest.mark.parametrize("options", [
    dict(fsdp_reshard="step"),                                  # pinned: nothing to compare, as a pinned mesh
    dict(microbatch_size=4),                                    # one microbatch: the two run alike
    dict(mesh={"pp": 2, "tp": 1}, schedule="1f1b"),             # a pipeline keeps the weights whatever it is asked
    dict(data_parallel="ddp"),                                  # DDP has nothing to reshard
])
def test_no_twin_where_it_cannot_differ_or_is_pinned(options):
    plan = _plan(**options)
    assert plan.search.alternatives is not None
    assert _twins(plan) == []
