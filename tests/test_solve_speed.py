"""The search's speed-ups change no number: the vectorised hull equals the scalar one, and alternatives solved side
by side equal alternatives solved one at a time."""

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
