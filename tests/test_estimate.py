"""estimate(): the step time and memory of a plan, term by term from the cost model."""

import networkx as nx
import pytest

from autoplan import cost
from autoplan.cluster import Cluster, Device
from autoplan.graph import Layer, ModelGraph
from autoplan.cost.plan_cost import Strategy, estimate, estimate_breakdown, layer_choice_cost
from autoplan.plan import Mesh, ModelInfo, Plan, Stage

from graphs import gpt_like_graph

GRAPH = gpt_like_graph(layers=4, hidden=512, seq=256, heads=8, vocab=8192)
CLUSTER = Cluster.preset("a100-80gb", nodes=2)  # 16 devices


def make_plan(**changes) -> Plan:
    names = [l.name for l in GRAPH.layers]
    base = dict(
        model=ModelInfo(GRAPH.model_name, GRAPH.fingerprint, GRAPH.num_params), cluster=CLUSTER,
        global_batch_size=32, microbatch_size=2, microbatches=4, mesh=Mesh(pp=2, dp=4, tp=2), schedule="1f1b",
        data_parallel="ddp", precision="bf16",
        stages=(Stage(tuple(names[:4]), ("blocks.1",)), Stage(tuple(names[4:]))),
        tensor_parallel={"blocks.0.attn.qkv": "colwise", "blocks.0.attn.proj": "rowwise",
                         "blocks.0.mlp.fc": "colwise", "blocks.0.mlp.proj": "rowwise"},
    )
    base.update(changes)
    return Plan(**base)


# A toy device and links with round rates, so that a whole step can be worked out by hand below.
_UNIT_DEVICE = Device("unit", 10**6, {"fp32": 1000.0, "bf16": 1000.0, "fp16": 1000.0}, achievable_flops_fraction=1.0,
                      memory_bandwidth_Bps=1000.0)
UNIT = Cluster(nodes=1, devices_per_node=2, device=_UNIT_DEVICE, intra_node_bandwidth_Bps=1000.0,
               inter_node_bandwidth_Bps=1000.0, intra_node_latency_s=0.0, inter_node_latency_s=0.0)


def _two_layer_graph(activation_bytes: int) -> ModelGraph:
    layers = [Layer(name, i, "linear", forward_flops=1000, backward_flops=2000, num_params=10, param_bytes=40,
                    activation_bytes=activation_bytes, output_bytes=40) for i, name in enumerate(("a", "b"))]
    return ModelGraph(model_name="Two", layers=layers, nx_graph=nx.DiGraph(), batch_size=1, dtype_bytes=4,
                      num_params=20, forward_flops=2000, backward_flops=4000, input_bytes=4,
                      fingerprint="two".ljust(16, "0"))


def _two_stage_plan(graph: ModelGraph) -> Plan:
    return Plan(model=ModelInfo("Two", graph.fingerprint, 20), cluster=UNIT, global_batch_size=4, microbatch_size=1,
                microbatches=4, mesh=Mesh(pp=2), schedule="1f1b", data_parallel="ddp", precision="fp32",
                stages=(Stage(("a",)), Stage(("b",))))


def test_step_time_worked_by_hand():
    """1000 FLOP/s, 1000 B/s links and memory. Per microbatch a layer runs 1000 forward + 2000 backward FLOPs: 3 s;
    stage 0 also sends 40 bytes forward and receives 40 back: 2 × 0.04 s. Step = 4 microbatches × 3.08 s + 1
    bubble stage-time (pp − 1) × 3.08 s + the AdamW update of 10 fp32 parameters, 10 × 28 B / 1000 B/s = 0.28 s
    (no data parallelism: no gradient sync) + the loss's broadcast from the last stage, 4 B / 1000 B/s = 0.004 s."""
    graph = _two_layer_graph(activation_bytes=0)
    predicted = estimate(graph, _two_stage_plan(graph))
    assert predicted.step_time_s == pytest.approx(4 * 3.08 + 3.08 + 0.28 + 0.004, rel=1e-12)
    assert (predicted.compute_s, predicted.bubble_s, predicted.optimizer_s) == pytest.approx((12.0, 3.08, 0.28))
    assert predicted.comm_s == pytest.approx(4 * 0.08 + 0.004)  # the sends of the slowest rank, every microbatch,
    # and the loss's broadcast
    assert predicted.samples_per_s == pytest.approx(4 / 15.684)


def test_memory_worked_by_hand():
    """Per device: 10 fp32 parameters with AdamW are 10 × 16 B = 160 B of model states. 1F1B: rank 0 holds the
    activations of pp − 0 = 2 microbatches (2 × 100 B) and its send buffer (40 B); rank 1 one microbatch (100 B),
    its receive buffer (40 B) and the loss buffers: 3 × 4 B × 10 logits = 120 B."""
    graph = _two_layer_graph(activation_bytes=100)
    assert estimate(graph, _two_stage_plan(graph)).peak_memory_bytes == (160 + 200 + 40, 160 + 100 + 40 + 120)


def test_memory_counts_states_in_flight_activations_and_transients():
    plan = make_plan()
    b = estimate_breakdown(GRAPH, plan)
    assert len(b.predicted.peak_memory_bytes) == plan.mesh.pp
    rank0, rank1 = b.ranks
    assert rank0.in_flight == 2 and rank1.in_flight == 1  # 1F1B: pp − rank (Narayanan et al. SC'21)
    assert rank0.model_state_bytes == cost.model_state_bytes(rank0.num_params, "bf16", "adamw", 4, "ddp")
    assert rank0.transient_bytes > 0  # blocks.1 rematerialises its activations in backward
    fsdp = estimate_breakdown(GRAPH, make_plan(data_parallel="fsdp"))
    assert fsdp.ranks[0].model_state_bytes < rank0.model_state_bytes
    assert fsdp.ranks[0].transient_bytes > rank0.transient_bytes  # gathered weights of one layer


def test_last_rank_holds_the_loss_buffers_of_one_microbatch_of_gathered_logits():
    b = estimate_breakdown(GRAPH, make_plan())
    head = GRAPH.layers[-1]
    logits_per_microbatch = head.output_bytes / GRAPH.dtype_bytes * 2 / GRAPH.batch_size  # mb = 2, not ÷ tp
    assert b.ranks[1].loss_bytes == cost.cross_entropy_bytes(logits_per_microbatch) > 0
    assert b.ranks[0].loss_bytes == 0
    # interleaved: the final stage (3) runs on rank 1 = (S − 1) mod pp, whatever the layout
    names = [l.name for l in GRAPH.layers]
    v2 = estimate_breakdown(GRAPH, make_plan(schedule="interleaved", virtual_stages=2, tensor_parallel={}, stages=(
        Stage(tuple(names[:3])), Stage(tuple(names[3:4])), Stage(tuple(names[4:5])), Stage(tuple(names[5:])))))
    assert [r.loss_bytes > 0 for r in v2.ranks] == [False, True]
    assert v2.ranks[1].loss_bytes == b.ranks[1].loss_bytes


def test_autocast_weight_copy_is_one_low_precision_copy_of_the_matmul_weights():
    plan = make_plan()  # DDP composed with pp and tp runs replicate(): a bf16 copy of every parameter it holds
    b = estimate_breakdown(GRAPH, plan)
    s = Strategy.of(plan)
    assert s.mixed_precision == "replicate"
    for rank, stage in zip(b.ranks, plan.stages):
        costs = [layer_choice_cost(GRAPH, GRAPH.layer(n), CLUSTER, s, n == "blocks.0", None) for n in stage.layers]
        # the stage's parameters; on the last stage the head holds the embedding's tied weight, which it owns none of
        held = sum(max(c.num_params, c.matmul_params) for c in costs)
        assert rank.weight_copy_bytes == 2 * held > 2 * sum(c.matmul_params for c in costs) - 1  # once per rank
    names = [l.name for l in GRAPH.layers]
    alone = make_plan(mesh=Mesh(pp=1, dp=16, tp=1), microbatches=1, stages=(Stage(tuple(names)),),
                      tensor_parallel={})  # classic DDP: autocast, a copy of the matmuls' weights only
    classic = Strategy.of(alone)
    assert classic.mixed_precision == "autocast"
    matmul = sum(layer_choice_cost(GRAPH, layer, CLUSTER, classic, False, None).matmul_params
                 for layer in GRAPH.layers)
    (rank,) = estimate_breakdown(GRAPH, alone).ranks
    assert rank.weight_copy_bytes == 2 * matmul > 0
    # blocks.0 is tensor-parallel: its linears' copy is sharded; the tied head copies the embedding weight
    block = GRAPH.layer("blocks.1")
    assert layer_choice_cost(GRAPH, block, CLUSTER, s, True, None).matmul_params * 2 == \
        layer_choice_cost(GRAPH, block, CLUSTER, s, False, None).matmul_params == 12 * 512 * 512
    assert layer_choice_cost(GRAPH, GRAPH.layer("head"), CLUSTER, s, False, None).matmul_params == 8192 * 512
    assert layer_choice_cost(GRAPH, GRAPH.layer("tok"), CLUSTER, s, False, None).matmul_params == 0  # a lookup
    fsdp = estimate_breakdown(GRAPH, make_plan(data_parallel="fsdp"))
    fp32 = estimate_breakdown(GRAPH, make_plan(precision="fp32"))
    assert [r.weight_copy_bytes for r in fsdp.ranks + fp32.ranks] == [0] * 4  # gathered bf16 weights instead


def test_the_head_s_rank_holds_its_own_copy_of_the_tied_weight():
    """The embedding's rank counts the tied weight in its layer; the head's rank holds a copy it steps and syncs too:
    model states, DDP (replicate) all-reduce bytes and optimizer, here 8192 × 512 elements (the head is not
    vocabulary-parallel in this plan), and the search prices the same."""
    from dataclasses import replace

    from autoplan.cost.traffic import plan_collectives
    from autoplan.solve.tables import LayerCostCache, StrategyTables, segments_of

    tied = replace(GRAPH, tied_parameters=[("tok.weight", "head.weight")], tied_numels=[8192 * 512])
    plan = make_plan()
    plain, copied = estimate_breakdown(GRAPH, plan), estimate_breakdown(tied, plan)
    copy = 8192 * 512
    assert [b.num_params - a.num_params for a, b in zip(plain.ranks, copied.ranks)] == [0, copy]
    assert copied.ranks[1].model_state_bytes - plain.ranks[1].model_state_bytes == 16 * copy  # bf16 AdamW states
    assert copied.ranks[1].optimizer_s > plain.ranks[1].optimizer_s and copied.ranks[0] == replace(
        plain.ranks[0], dp_sync_s=copied.ranks[0].dp_sync_s)  # rank 0 only adds the tied all-reduce
    before, after = plan_collectives(GRAPH, plan)[1], plan_collectives(tied, plan)[1]
    dp_bytes = [sum(c.nbytes for c in got if c.axis == "dp" and c.nbytes > 4) for got in (before, after)]
    assert dp_bytes[1] - dp_bytes[0] == 4 * copy  # its fp32 gradient in the replicas' all-reduce
    tables = StrategyTables(tied, CLUSTER, Strategy.of(plan), segments_of(tied.layers), LayerCostCache(tied, CLUSTER),
                            "none", 32)
    index = {layer.name: layer.index for layer in tied.layers}

    def unsharded(name: str):
        return next(c.choice for c in tables.choices[tables.segment_of[index[name]]] if not c.choice.tp_on)

    assignment = [[(index[n], unsharded(n)) for n in stage.layers] for stage in plan.stages]
    assert tables.tied_costs(assignment)[1] == (0, copy)
    assert tables.evaluate(assignment).ranks[1].num_params - copy == sum(
        tables._cost(i, choice).num_params for i, choice in assignment[1])
    (term,) = tables.tied_sync_terms  # CP-SAT's memory and tail: the copy on the last stage's rank
    assert term.off_copy == (0, copy)


def test_interleaved_ranks_hold_chunk_activations_at_one_vth_of_the_rank_each():
    names = [l.name for l in GRAPH.layers]
    plan = make_plan(schedule="interleaved", virtual_stages=2, microbatches=4, tensor_parallel={}, stages=(
        Stage(tuple(names[:3])), Stage(tuple(names[3:4])), Stage(tuple(names[4:5])), Stage(tuple(names[5:]))))
    b = estimate_breakdown(GRAPH, plan)
    s = Strategy.of(plan)
    for rank in b.ranks:
        chunks = cost.in_flight_microbatches("interleaved", rank.rank, pp=2, microbatches=4, virtual_stages=2)
        assert rank.in_flight == chunks / 2  # rank 0: 2(pp − 1) + (v − 1)·pp + 1 = 5 chunks = 2.5 ranks
        per_mb = sum(layer_choice_cost(GRAPH, GRAPH.layer(n), CLUSTER, s, False, None).activation_bytes
                     for k in rank.stages for n in plan.stages[k].layers)
        assert rank.activation_bytes == int(chunks / 2 * per_mb)
    assert b.ranks[0].in_flight == 2 + (2 - 1) / 2  # Korthikanti et al. 2022 §4.2.3: pp + (pp − 1)/v


def test_recompute_trades_time_for_memory():
    with_rc = estimate_breakdown(GRAPH, make_plan())
    without = estimate_breakdown(GRAPH, make_plan(stages=tuple(Stage(s.layers) for s in make_plan().stages)))
    assert with_rc.ranks[0].activation_bytes < without.ranks[0].activation_bytes
    assert with_rc.ranks[0].recompute_s > 0 == without.ranks[0].recompute_s


def test_interleaved_bubble_is_charged_per_slowest_stage():
    names = [l.name for l in GRAPH.layers]
    balanced = make_plan(schedule="interleaved", virtual_stages=2, tensor_parallel={}, stages=(
        Stage(tuple(names[:3])), Stage(tuple(names[3:4])), Stage(tuple(names[4:5])), Stage(tuple(names[5:]))))
    b = estimate_breakdown(GRAPH, balanced)
    assert b.ranks[0].stages == (0, 2)
    # one entry per stage (DESIGN.md): stage k runs on pipeline rank k mod pp
    assert b.predicted.peak_memory_bytes == (b.ranks[0].peak_bytes, b.ranks[1].peak_bytes) * 2
    assert b.rank_peak_memory_bytes == (b.ranks[0].peak_bytes, b.ranks[1].peak_bytes)
    assert b.bubble_s == pytest.approx(b.step_time_s - 4 * b.slowest_rank.microbatch_s
                                       - max(r.tail_s for r in b.ranks))


def test_plan_for_another_model_is_rejected():
    plan = make_plan(stages=(Stage(("tok", "pos", "blocks.0", "nope")), Stage(("blocks.2", "blocks.3", "ln_f",
                                                                              "head"))))
    with pytest.raises(ValueError, match="does not have"):
        estimate(GRAPH, plan)
    names = [l.name for l in GRAPH.layers]
    with pytest.raises(ValueError, match="model order"):
        estimate(GRAPH, make_plan(stages=(Stage(tuple(names[4:])), Stage(tuple(names[:4])))))


def test_recomputing_a_module_no_layer_offers_is_refused_not_priced_as_nothing():
    names = [l.name for l in GRAPH.layers]
    plan = make_plan(stages=(Stage(tuple(names[:4]), ("blocks.1.mlp.fc",)), Stage(tuple(names[4:]))))
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc.*recompute option"):
        estimate(GRAPH, plan)
