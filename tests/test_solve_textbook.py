"""The planner gives the textbook answers, honours every pin, and says why when nothing fits."""

import dataclasses

import pytest

from autoplan.cluster import Cluster, PRESETS
from autoplan.errors import InfeasiblePlanError
from autoplan.cost.plan_cost import estimate
from autoplan.options import PlanOptions
from autoplan.solve import search

from graphs import gpt_like_graph

A100 = Cluster.preset("a100-80gb")


def test_small_model_with_ample_memory_is_pure_data_parallel():
    graph = gpt_like_graph(layers=2, hidden=256, seq=256, heads=4, vocab=4096)
    plan = search(graph, A100, PlanOptions(global_batch_size=256))
    assert (plan.mesh.pp, plan.mesh.dp, plan.mesh.tp) == (1, 8, 1)
    assert plan.recompute == ()


def test_model_too_big_for_one_device_is_split_by_tensor_or_pipeline_parallelism():
    graph = gpt_like_graph(layers=8, hidden=8192, seq=1024, heads=64, vocab=32000)  # 6.7B params: 107 GB of states
    plan = search(graph, A100, PlanOptions(global_batch_size=64, data_parallel="ddp"))
    assert plan.mesh.tp > 1 or plan.mesh.pp > 1
    assert max(plan.predicted.peak_memory_bytes) <= A100.device.usable_memory_bytes
    auto = search(graph, A100, PlanOptions(global_batch_size=64))
    assert auto.data_parallel == "fsdp" or auto.mesh.tp > 1 or auto.mesh.pp > 1


@pytest.mark.parametrize("tp_across_nodes", [False, True])
def test_slow_inter_node_links_keep_tensor_parallel_inside_nodes(tp_across_nodes):
    spec = dict(PRESETS["a100-80gb"], devices_per_node=4, inter_node_bandwidth_Bps=5e9)
    cluster = Cluster(nodes=2, **spec)
    graph = gpt_like_graph(layers=8, hidden=8192, seq=1024, heads=64, vocab=32000)
    plan = search(graph, cluster, PlanOptions(global_batch_size=32, data_parallel="ddp", mesh={"dp": 1},
                                              tp_across_nodes=tp_across_nodes))
    # Tensor parallelism stays inside a 4-GPU node; pp2×tp4 and pp4×tp2 are within 0.5% of each other.
    assert plan.mesh.tp in (2, 4) and plan.mesh.pp * plan.mesh.tp == 8


def test_every_pin_is_honoured():
    graph = gpt_like_graph(layers=4, hidden=512, seq=256, heads=8, vocab=8192)
    plan = search(graph, A100, PlanOptions(global_batch_size=64, mesh={"pp": 2, "tp": 2}, microbatch_size=2,
                                           recompute="full", data_parallel="fsdp", schedule="gpipe"))
    assert (plan.mesh.pp, plan.mesh.dp, plan.mesh.tp) == (2, 2, 2)
    assert (plan.microbatch_size, plan.schedule, plan.data_parallel) == (2, "gpipe", "fsdp")
    full = {l.name for l in graph.layers if any(o.module == l.name for o in l.recompute_options)}
    assert set(plan.recompute) == full
    assert plan.search.status == "OPTIMAL"
    none = search(graph, A100, PlanOptions(global_batch_size=64, recompute="none", schedule="interleaved",
                                           mesh={"pp": 2}))
    assert none.recompute == () and none.schedule == "interleaved" and none.virtual_stages >= 2
    selective = search(graph, A100, PlanOptions(global_batch_size=64, recompute="selective", mesh={"pp": 1}))
    assert selective.recompute and all(m.endswith(".attn.core") for m in selective.recompute)


def test_pins_that_admit_no_layout_are_a_value_error():
    graph = gpt_like_graph(layers=2, hidden=256, seq=128, heads=4, vocab=1000)
    with pytest.raises(ValueError, match="multiply to 16"):
        search(graph, A100, PlanOptions(global_batch_size=64, mesh={"pp": 2, "dp": 8}))
    with pytest.raises(ValueError, match="global batch 7"):
        search(graph, A100, PlanOptions(global_batch_size=7, mesh={"dp": 8}))


def test_infeasible_names_the_memory_needed_and_what_to_relax():
    graph = gpt_like_graph(layers=8, hidden=8192, seq=1024, heads=64, vocab=32000)
    small = Cluster.preset("a100-40gb", nodes=1, devices_per_node=1)
    with pytest.raises(InfeasiblePlanError) as info:
        search(graph, small, PlanOptions(global_batch_size=8, recompute="none", data_parallel="ddp"))
    message = str(info.value)
    assert "GiB per device" in message and "38.00 GiB usable" in message
    assert "more devices" in message and "recompute='full'" in message and "fsdp" in message
    assert info.value.min_memory_bytes > info.value.capacity_bytes == small.device.usable_memory_bytes


def test_same_plan_every_run():
    graph = gpt_like_graph(layers=6, hidden=1024, seq=512, heads=16, vocab=8192)
    cluster = Cluster.preset("a100-40gb", nodes=2)
    first, second = (search(graph, cluster, PlanOptions(global_batch_size=128)) for _ in range(2))
    a, b = first.to_dict(), second.to_dict()
    for d in (a, b):
        d["search"]["wall_s"] = 0.0
    assert a == b
    assert estimate(graph, first) == first.predicted


@pytest.mark.parametrize("tp", [2, 4])
def test_layers_sharing_a_tied_weight_agree_on_tensor_parallelism(tp):
    def graph(tied: bool):
        g = gpt_like_graph(layers=2, hidden=1024, seq=512, heads=16, vocab=32768)
        g.layers[0] = dataclasses.replace(g.layers[0], tp_groups=())  # an embedding that cannot shard
        g.tied_parameters = [("tok.weight", "head.weight")] if tied else []
        return g

    options = PlanOptions(global_batch_size=64, mesh={"tp": tp})
    assert "head" in search(graph(tied=False), A100, options).tensor_parallel  # sharding the head pays
    tied = search(graph(tied=True), A100, options)
    assert "head" not in tied.tensor_parallel and "tok" not in tied.tensor_parallel
    assert any(name.startswith("blocks.") for name in tied.tensor_parallel)


def test_a_pinned_tp_is_not_planned_with_fsdp_that_would_leave_fused_biased_projections_whole():
    from autoplan.graph import TensorParallelGroup
    from autoplan.solve.space import enumerate_strategies

    graph = gpt_like_graph(layers=2)
    fused = []
    for layer in graph.layers:
        if layer.name.startswith("blocks."):
            group = TensorParallelGroup({f"{layer.name}.attn.qkv": "colwise:3", f"{layer.name}.attn.proj": "rowwise"},
                                        4, 0, 0, 0, 0, 0)
            layer = dataclasses.replace(layer, tp_groups=(group,), param_names=(f"{layer.name}.attn.qkv.bias",))
        fused.append(layer)
    graph = dataclasses.replace(graph, layers=fused)
    cluster = Cluster.preset("a100-80gb", nodes=1, devices_per_node=4)
    pinned = enumerate_strategies(graph, cluster, PlanOptions(global_batch_size=8, mesh={"dp": 2, "tp": 2}))
    assert {s.data_parallel for s in pinned} == {"ddp"}
    free = enumerate_strategies(graph, cluster, PlanOptions(global_batch_size=8))
    assert "fsdp" in {s.data_parallel for s in free if s.tp == 2}
