"""The search returns the brute-force optimum of estimate() on small cases."""

import itertools

import pytest

from autoplan.cluster import Cluster, Device
from autoplan.errors import InfeasiblePlanError
from autoplan.cost.plan_cost import compose, estimate, layer_choice_cost
from autoplan.options import PlanOptions
from autoplan.solve import search
from autoplan.solve.space import enumerate_strategies, layer_choices
from autoplan.solve.bounds import lower_bound_s, refined_bound
from autoplan.solve.tables import LayerCostCache, StrategyTables, segments_of

from graphs import gpt_like_graph, mlp_graph

GiB = 2**30


def small_cluster(memory_gib: float, nodes: int = 1, per_node: int = 4) -> Cluster:
    device = Device("test-gpu", int(memory_gib * GiB), {"fp32": 20e12, "bf16": 300e12, "fp16": 300e12}, 0.5,
                    0, 2e12)
    return Cluster(nodes=nodes, devices_per_node=per_node, device=device, intra_node_bandwidth_Bps=100e9,
                   inter_node_bandwidth_Bps=10e9, intra_node_latency_s=5e-6, inter_node_latency_s=20e-6)


def brute_force(graph, cluster, options):
    """min over every strategy, contiguous cut and per-layer choice of compose(); None when nothing fits."""
    per_strategy = brute_force_per_strategy(graph, cluster, options)
    return min((v for v in per_strategy.values() if v is not None), default=None)


def brute_force_per_strategy(graph, cluster, options):
    """{strategy: its fastest fitting layout's step time, or None}."""
    out = {}
    n = len(graph.layers)
    batch = options.global_batch_size
    for s in enumerate_strategies(graph, cluster, options):
        best = None
        per_layer = []
        for layer in graph.layers:
            per_layer.append([layer_choice_cost(graph, layer, cluster, s, c.tp_on, c.option(layer))
                              for c in layer_choices(layer, s.tp, options.recompute)])
        for inner in itertools.combinations(range(1, n), s.num_stages - 1):
            cuts = (0, *inner, n)
            for combo in itertools.product(*per_layer):
                stages = [list(combo[a:b]) for a, b in zip(cuts, cuts[1:])]
                result = compose(s, cluster, stages, batch)
                if result.fits and (best is None or result.step_time_s < best):
                    best = result.step_time_s
        out[s] = best
    return out


def gpt_small():
    return gpt_like_graph(layers=2, hidden=512, seq=512, heads=8, vocab=8192)


def gpt_tiny():
    return gpt_like_graph(layers=2, hidden=256, seq=256, heads=4, vocab=4096)


def mlp():
    return mlp_graph((512, 2048, 2048, 2048, 512), batch=64)


# (graph, device memory GiB, cluster shape, options). Each memory is tight: the unconstrained optimum does not
# fit, so recompute, FSDP, TP or PP must be weighed (checked below).
CASES = [
    (gpt_small, 0.1, {}, PlanOptions(global_batch_size=8)),
    (gpt_small, 0.08, {}, PlanOptions(global_batch_size=8)),
    (gpt_tiny, 0.025, {"nodes": 2, "per_node": 2}, PlanOptions(global_batch_size=8, data_parallel="ddp")),
    (mlp, 0.04, {}, PlanOptions(global_batch_size=64, precision="fp32")),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_search_matches_brute_force(case):
    make_graph, memory_gib, shape, options = CASES[case]
    graph, cluster = make_graph(), small_cluster(memory_gib, **shape)
    expected = brute_force(graph, cluster, options)
    assert expected is not None
    assert brute_force(graph, small_cluster(100.0, **shape), options) < expected * (1 - 1e-3)  # memory binds
    plan = search(graph, cluster, options)
    assert plan.search.status == "OPTIMAL"
    assert plan.predicted.step_time_s == pytest.approx(expected, rel=1e-6)
    assert estimate(graph, plan).step_time_s == pytest.approx(plan.predicted.step_time_s, rel=1e-12)
    assert max(plan.predicted.peak_memory_bytes) <= cluster.device.usable_memory_bytes


@pytest.mark.parametrize("make_graph, memory_gib, options", [
    (gpt_small, 0.05, PlanOptions(global_batch_size=8)),
    (mlp, 0.037, PlanOptions(global_batch_size=64, precision="fp32")),
])
def test_brute_force_and_search_agree_on_infeasible(make_graph, memory_gib, options):
    graph, cluster = make_graph(), small_cluster(memory_gib)
    assert brute_force(graph, cluster, options) is None
    with pytest.raises(InfeasiblePlanError) as info:
        search(graph, cluster, options)
    assert info.value.min_memory_bytes > cluster.device.usable_memory_bytes == info.value.capacity_bytes


@pytest.mark.parametrize("case, tightens", [(0, True), (3, False)])  # the MLP has no repeated layers
def test_bounds_never_exceed_a_strategys_optimum(case, tightens):
    """The pruning is exact: both lower bounds sit at or below every strategy's true optimum (inf: no fit)."""
    make_graph, memory_gib, shape, options = CASES[case]
    graph, cluster = make_graph(), small_cluster(memory_gib, **shape)
    cache = LayerCostCache(graph, cluster)
    tight = 0
    for strategy, optimum in brute_force_per_strategy(graph, cluster, options).items():
        tables = StrategyTables(graph, cluster, strategy, segments_of(graph.layers, strategy.sequence_parallel),
                                cache, options.recompute, options.global_batch_size)
        simple, refined = lower_bound_s(tables), refined_bound(tables).bound_s
        assert simple <= refined
        if optimum is None:
            continue
        assert refined <= optimum * (1 + 1e-9)
        tight += refined > simple
    assert (tight > 0) == tightens  # the memory-aware bound tightens GPT strategies


def test_layer_cost_memo_equals_pricing_each_strategy_afresh():
    """The memo shares a layer's cost across strategies only where everything the cost reads is equal: FSDP
    units, per-step fixed costs and shared-processor contention differ between strategies of one tp degree."""
    graph = gpt_tiny()
    cluster = Cluster.preset("a100-80gb")
    cache = LayerCostCache(graph, cluster)
    segments = segments_of(graph.layers)
    strategies = list(enumerate_strategies(graph, cluster, PlanOptions(global_batch_size=16)))
    assert {s.data_parallel for s in strategies} == {"ddp", "fsdp"} and len({s.pp for s in strategies}) > 1
    checked = 0
    for s in strategies:
        for seg in segments:
            for i in range(seg.start, seg.stop):
                layer = graph.layers[i]
                for choice in cache.choices(layer, s.tp, "auto", s.sequence_parallel):
                    assert cache.get(layer, seg.signature, s, choice) == layer_choice_cost(
                        graph, layer, cluster, s, choice.tp_on, choice.option(layer)), (s, layer.name, choice)
                    checked += 1
    assert checked > 1000
