"""The search's speed-ups change no number: the vectorised hull equals the scalar one, alternatives solved side
by side equal alternatives solved one at a time, and alternatives judged on first read equal those judged at once."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import autoplan
from autoplan.options import PlanOptions
from autoplan.solve import alternatives, search
from autoplan.solve.bounds import LowerHull
from autoplan.synthetic import gpt_like_graph


def test_vectorised_hull_gives_the_scalar_values_bit_for_bit():
    rng = random.Random(0)
    for _ in range(500):
        points = [(rng.choice([rng.uniform(0, 10), float(rng.randint(0, 5))]), rng.uniform(0, 5))
                  for _ in range(rng.randint(1, 6))]
        hull = LowerHull(points)
        xs = np.array([rng.uniform(-1, 12) for _ in range(40)] + [m for m, _ in hull.hull])
        assert hull.at(xs).tolist() == [hull(float(x)) for x in xs]


def test_alternatives_solved_side_by_side_equal_one_at_a_time(monkeypatch):
    graph = gpt_like_graph(layers=6, hidden=512, seq=512, vocab=1000)
    cluster = autoplan.Cluster.preset("a100-40gb", nodes=2)
    options = PlanOptions(global_batch_size=64)
    monkeypatch.setattr(alternatives.os, "cpu_count", lambda: 4)
    side_by_side = search(graph, cluster, options)
    monkeypatch.setattr(alternatives.os, "cpu_count", lambda: 1)
    one_by_one = search(graph, cluster, options)
    assert len(side_by_side.search.alternatives) >= 3
    assert side_by_side.search.alternatives == one_by_one.search.alternatives
    assert side_by_side.predicted == one_by_one.predicted and side_by_side.stages == one_by_one.stages


def test_alternatives_judged_on_first_read_equal_those_judged_at_once():
    """The report read later (after another search ran in between) is the one judged before returning."""
    graph = gpt_like_graph(layers=6, hidden=512, seq=512, vocab=1000)
    cluster = autoplan.Cluster.preset("a100-40gb", nodes=2)
    options = PlanOptions(global_batch_size=64)
    eager = search(graph, cluster, options, lazy_alternatives=False)
    lazy = search(graph, cluster, options)
    assert isinstance(lazy.search.alternatives, alternatives.LazyAlternatives)
    assert not lazy.search.alternatives.judged  # nothing paid for yet
    other = search(gpt_like_graph(layers=3, hidden=256, seq=128, vocab=500), cluster, PlanOptions(global_batch_size=16))
    assert other.search.alternatives  # judged in between: shares nothing with the first report
    assert lazy.predicted == eager.predicted and lazy.stages == eager.stages and lazy.mesh == eager.mesh
    assert len(eager.search.alternatives) >= 3
    assert tuple(lazy.search.alternatives) == tuple(eager.search.alternatives)
    as_json = lazy.to_dict()["search"], eager.to_dict()["search"]
    assert [{k: v for k, v in d.items() if k != "wall_s"} for d in as_json][0] == \
        [{k: v for k, v in d.items() if k != "wall_s"} for d in as_json][1]
    assert autoplan.Plan.from_dict(lazy.to_dict()).search.alternatives == eager.search.alternatives
    assert "Alternatives" in lazy.explain() and lazy.explain() == eager.explain()


class _Swap(torch.nn.Module):
    """A pair whose forward may swap the halves of its hidden features: sound unswapped, unsound swapped, with
    the same class, parameter shapes and inputs either way."""

    def __init__(self, swap: bool):
        super().__init__()
        self.swap = swap
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.up(x))
        if self.swap:
            h = torch.cat([h[..., 8:], h[..., :8]], dim=-1)
        return x + self.down(h)


def test_tp_verdicts_are_reused_only_for_blocks_that_read_the_same(monkeypatch):
    from autoplan.trace import tp_check
    from autoplan.trace.tp_groups import DetectedGroup

    def pairs(model):
        return [DetectedGroup({f"{i}.up": "colwise", f"{i}.down": "rowwise"}, 16, f"{i}.down", (f"{i}.up", f"{i}.down"))
                for i in range(len(model))]

    checked = []
    real = tp_check._check_one
    monkeypatch.setattr(tp_check, "_check_one", lambda model, group, *a: checked.append(group) or real(model, group, *a))
    monkeypatch.setattr(tp_check, "VERDICTS", tp_check.VERDICTS.__class__())
    x = torch.randn(2, 8)
    def stack(*swaps):
        blocks = torch.nn.Sequential(*(_Swap(swap) for swap in swaps))
        for i, block in enumerate(blocks):
            block.layer_idx = i  # each block's own index (as transformers' layers hold it) is no difference
        return blocks

    same = stack(False, False, False)
    kept, dropped = tp_check.check_tp_groups(same, pairs(same), (x,), {})
    assert len(kept) == 3 and dropped == [] and len(checked) == 1  # identical blocks: one check
    # a block that differs only in an attribute its forward reads is checked on its own, and dropped
    mixed = stack(False, True)
    kept, dropped = tp_check.check_tp_groups(mixed, pairs(mixed), (x,), {})
    assert [g.styles for g in kept] == [pairs(mixed)[0].styles] and [d.styles for d in dropped] == [pairs(mixed)[1].styles]
    assert len(checked) == 2 and "computes other numbers" in dropped[0].reason and "1's code" in dropped[0].reason
    # the same structure traced again: both verdicts reused, the reason naming this model's module
    again = stack(True, False)
    kept, dropped = tp_check.check_tp_groups(again, pairs(again), (x,), {})
    assert len(checked) == 2 and [d.styles for d in dropped] == [pairs(again)[0].styles] and len(kept) == 1
    assert "0's code" in dropped[0].reason
    # other inputs (a longer feature row cannot pass; a longer batch of rows can) or other weights' shapes: checked
    kept, dropped = tp_check.check_tp_groups(same, pairs(same), (torch.randn(2, 3, 8),), {})
    assert len(checked) == 3 and len(kept) == 3
    wide = stack(False)
    wide[0].up, wide[0].down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)
    tp_check.check_tp_groups(wide, pairs(wide), (x,), {})
    assert len(checked) == 4


def test_pruned_search_returns_the_optimum_of_pricing_every_strategy():
    """Branch and bound skips strategies by their bounds; pricing every strategy (greedy and CP-SAT on each, no
    incumbent) must find nothing faster than the plan it returns, and the plan must be OPTIMAL."""
    from autoplan.solve.bounds import refined_bound
    from autoplan.solve.cpsat import solve_strategy
    from autoplan.solve.greedy import greedy
    from autoplan.solve.tables import build_tables

    graph = gpt_like_graph(layers=4, hidden=1024, seq=1024, vocab=8000)
    cluster = autoplan.Cluster.preset("a100-40gb")
    options = PlanOptions(global_batch_size=16, recompute="none")
    plan = search(graph, cluster, options)
    best_s, priced = float("inf"), 0
    for tables in build_tables(graph, cluster, options):
        bound = refined_bound(tables)
        if bound.bound_s == float("inf"):
            continue
        found = greedy(tables)
        if found is not None and found[1].fits:
            best_s = min(best_s, found[1].step_time_s)
        result = solve_strategy(tables, bound, cutoff_s=None, hint=None, time_limit_s=5.0)
        assert result.status in ("OPTIMAL", "INFEASIBLE")
        if result.assignment is not None:
            cost = tables.evaluate(result.assignment)
            if cost.fits:
                best_s = min(best_s, cost.step_time_s)
        priced += 1
    assert priced > 20 and plan.search.candidates > priced // 2
    assert plan.search.status == "OPTIMAL"
    assert plan.predicted.step_time_s == pytest.approx(best_s, rel=1e-9)


def test_a_time_limit_spent_before_any_layout_still_returns_one_marked_feasible():
    graph = gpt_like_graph(layers=4, hidden=256, seq=128, vocab=1000)
    plan = search(graph, autoplan.Cluster.preset("a100-80gb"), PlanOptions(global_batch_size=16, time_limit_s=1e-9))
    assert plan.search.status == "FEASIBLE" and plan.search.gap > 0
    assert plan.predicted.step_time_s > 0 and plan.mesh.world_size == 8


def _tied_gpt(vocab: int = 32000, hidden: int = 256):
    graph = gpt_like_graph(layers=4, hidden=hidden, seq=128, heads=4, vocab=vocab)
    graph.tied_parameters, graph.tied_numels = [("tok.weight", "head.weight")], [vocab * hidden]
    return graph


def test_search_objective_prices_the_tied_weight_sync_as_the_plan_predicts():
    """Embedding and head on two pipeline ranks sync their tied gradient once per step: the layouts the search
    compares (greedy, CP-SAT's objective) carry that all-reduce, as plan.predicted does."""
    from autoplan.cost.plan_cost import estimate
    from autoplan.plan import SearchInfo
    from autoplan.solve import build_plan
    from autoplan.solve.bounds import refined_bound
    from autoplan.solve.cpsat import solve_strategy
    from autoplan.solve.greedy import greedy
    from autoplan.solve.tables import build_tables

    graph, cluster = _tied_gpt(), autoplan.Cluster.preset("a100-80gb", nodes=2)
    options = PlanOptions(global_batch_size=16, mesh={"pp": 2, "tp": 2}, microbatch_size=1, schedule="1f1b")
    checked = 0
    for tables in build_tables(graph, cluster, options):
        assignment, cost = greedy(tables)
        tied, _ = tables.tied_costs(assignment)
        assert len(tied) == 2 and min(tied) > 1e-4 * cost.step_time_s  # embedding and head apart: both pay
        result = solve_strategy(tables, refined_bound(tables), cutoff_s=None, hint=None, time_limit_s=5.0)
        solved = tables.evaluate(result.assignment)
        assert result.status == "OPTIMAL" and result.objective_s == pytest.approx(solved.step_time_s, rel=1e-6)
        assert solved.step_time_s <= cost.step_time_s * (1 + 1e-9)
        plan = build_plan(graph, cluster, tables.strategy, result.assignment, 16,
                          SearchInfo(solver="cp-sat", status="OPTIMAL", wall_s=0.0, candidates=1))
        assert estimate(graph, plan).step_time_s == pytest.approx(solved.step_time_s, rel=1e-12)
        checked += 1
    assert checked == 4  # DDP and FSDP, sequence parallelism on and off
    plan = search(graph, cluster, options)
    assert plan.predicted.step_time_s == pytest.approx(
        min(tables.evaluate(solve_strategy(tables, refined_bound(tables), cutoff_s=None, hint=None,
                                           time_limit_s=5.0).assignment).step_time_s
            for tables in build_tables(graph, cluster, options)), rel=1e-9)


def test_bounds_counting_a_sequence_parallel_run_whole_stay_below_each_strategys_optimum():
    """The refined bound counts a sequence-parallel run's last block (a segment of its own, dearer) as one more
    block, and bounds an interleaved schedule's slowest stage: still never above what CP-SAT proves optimal, and
    above the bound without either."""
    from autoplan.solve.bounds import refined_bound
    from autoplan.solve.cpsat import solve_strategy
    from autoplan.solve.tables import build_tables

    graph, cluster = gpt_like_graph(layers=8, hidden=256, seq=128, heads=4, vocab=1000), \
        autoplan.Cluster.preset("a100-80gb")
    options = PlanOptions(global_batch_size=16, mesh={"pp": 2, "tp": 2}, microbatch_size=1, sequence_parallel=True,
                          data_parallel="ddp")
    seen = set()
    for tables in build_tables(graph, cluster, options):
        bound = refined_bound(tables)
        assert len(bound.segments) == 2 and bound.segments[0] == bound.segment  # the blocks and the last block
        result = solve_strategy(tables, bound, cutoff_s=None, hint=None, time_limit_s=5.0)
        assert result.status == "OPTIMAL"
        assert bound.bound_s <= tables.evaluate(result.assignment).step_time_s * (1 + 1e-9)
        seen.add((tables.strategy.schedule, tables.strategy.virtual_stages))
    assert {("1f1b", 1), ("interleaved", 2), ("gpipe", 1)} <= seen


def test_relaxed_rows_shared_across_microbatch_counts_stay_below_each_strategys_exact_bound():
    """Strategies that differ only in microbatch count (and data-parallel size, schedule) share relaxed rows
    priced at their most microbatches: the cheap bound still never exceeds any one's exact lower bound, with
    sequence parallelism (whose norm-gradient all-reduce is spread over the microbatches) on and off."""
    from autoplan.solve.bounds import lower_bound_s
    from autoplan.solve.tables import LazyTables

    graph = gpt_like_graph(layers=8, hidden=256, seq=128, heads=4, vocab=1000)
    lazy = LazyTables(graph, autoplan.Cluster.preset("a100-80gb", devices_per_node=8),
                      PlanOptions(global_batch_size=32))
    counts = {}
    for i, s in enumerate(lazy.strategies):
        assert lower_bound_s(lazy.relaxed(i)) <= lower_bound_s(lazy[i])
        counts.setdefault((s.tp, s.microbatch_size, s.sequence_parallel), set()).add(s.microbatches)
    assert any(sp and len(m) > 1 for (_, _, sp), m in counts.items())  # rows shared across microbatch counts
    assert len(lazy._relaxed) < len({(s.tp, s.microbatch_size, s.sequence_parallel, s.microbatches,
                                      s.data_parallel == "fsdp" and s.dp > 1) for s in lazy.strategies})
