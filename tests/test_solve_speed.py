"""The search's speed-ups change no number: the vectorised hull equals the scalar one, alternatives solved side
by side equal alternatives solved one at a time, and alternatives judged on first read equal those judged at once."""

from __future__ import annotations

import random

import numpy as np

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
