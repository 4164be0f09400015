"""The measured figures of a calibrated cluster, as the cost model reads them: per-size matmul efficiency,
collective times per kind / group size / message size, ranks sharing processors, per-step fixed costs; and
their JSON form. Pure functions, no processes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from autoplan import Cluster
from autoplan.calibrate import group_overheads_s, interleaved_medians, monotone, overlap_fraction
from autoplan.cost import (compute_contention, group_allgather_s, group_allreduce_s, group_p2p_s,
                           layer_step_overhead_s)
from autoplan.cost.plan_cost import Strategy, layer_choice_cost, layer_cost_context
from autoplan.cost.step import data_parallel_sync_s
from autoplan.synthetic import gpt_like_graph

CPU = Cluster.preset("cpu")  # 4 ranks in one node
TABLE = {"all_reduce": {"2": [[1e3, 1e-3], [1e5, 2e-3], [1e6, 6e-3]], "4": [[1e3, 3e-3], [1e6, 12e-3]]},
         "all_gather": {"4": [[1e3, 2e-3], [1e6, 5e-3]]},
         "reduce_scatter": {"4": [[1e3, 2.5e-3], [1e6, 6e-3]]},
         "send": {"2": [[1e3, 0.5e-3], [1e6, 2.5e-3]]}}
MEASURED = replace(CPU, collective_times=TABLE, compute_concurrency=2.0,
                   device=replace(CPU.device, matmul_efficiency={"fp32": [[1e4, 0.1], [1e6, 0.4], [1e8, 1.0]]},
                                  tp_layer_overhead_s=1e-3, fsdp_layer_overhead_s=5e-4,
                                  optimizer_tensor_overhead_s=1e-5, dtensor_optimizer_tensor_overhead_s=1e-4))


def test_measured_collectives_replace_the_formula_inside_the_node():
    # between points: linear in bytes; beyond the largest: the last segment's slope; below: the smallest's time
    assert group_allreduce_s(5.5e5, MEASURED, 2, 1) == pytest.approx(4e-3)
    assert group_allreduce_s(2e6, MEASURED, 2, 1) == pytest.approx(6e-3 + 1e6 * 4e-3 / 9e5)
    assert group_allreduce_s(10, MEASURED, 4, 1) == pytest.approx(3e-3)
    assert group_allgather_s(1e6, MEASURED, 4, 1) == pytest.approx(5e-3)
    assert group_p2p_s(1e6, MEASURED, 2, 2) == pytest.approx(2.5e-3)
    # a size or kind with no points keeps the alpha-beta formula: the preset's figures
    assert group_allgather_s(1e6, MEASURED, 2, 1) == group_allgather_s(1e6, CPU, 2, 1)
    two_nodes = replace(MEASURED, nodes=2)
    assert group_allreduce_s(1e6, two_nodes, 4, 2) == group_allreduce_s(1e6, replace(CPU, nodes=2), 4, 2)


def test_data_parallel_sync_uses_each_kind_s_measured_line():
    # FSDP with one microbatch: two all-gathers of the weights, one reduce-scatter of the gradients (fp32)
    params = 250_000  # 1 MB at 4 bytes: the largest measured point of each kind
    sync = data_parallel_sync_s(params, MEASURED, dp=4, stride=1, data_parallel="fsdp", precision="fp32")
    assert sync == pytest.approx(2 * 5e-3 + 6e-3)
    ddp = data_parallel_sync_s(params, MEASURED, dp=4, stride=1, data_parallel="ddp", precision="fp32")
    assert ddp == pytest.approx(12e-3)


def test_smaller_tensor_parallel_matmuls_run_at_a_lower_measured_efficiency():
    graph = gpt_like_graph(layers=1, hidden=64, seq=16, heads=4, vocab=100)
    block = graph.layer("blocks.0")
    flat = replace(MEASURED, device=replace(MEASURED.device, matmul_efficiency=(), tp_layer_overhead_s=0.0,
                                            layer_overhead_s=0.0, memory_bandwidth_Bps=1e30),
                   compute_concurrency=0.0)
    sized = replace(flat, device=replace(flat.device, matmul_efficiency=MEASURED.device.matmul_efficiency))

    def forward_s(cluster, tp):
        strategy = Strategy(1, 1, tp, 1, 1, "1f1b", "ddp", precision="fp32")
        return layer_choice_cost(graph, block, cluster, strategy, tp > 1, None).forward_s

    assert forward_s(flat, 2) == pytest.approx(forward_s(flat, 1) / 2)  # one fraction: tp halves the time
    assert forward_s(sized, 2) > 0.55 * forward_s(sized, 1)  # the halves run further from peak


def test_ranks_sharing_processors_slow_compute_and_shrink_the_bubble():
    # 4 ranks, 2 at full speed at once: without a pipeline every rank is busy, 2× slower than alone
    assert compute_contention(MEASURED, pp=1, microbatches=4, schedule="1f1b") == 2.0
    # pp = 4, m = 8, 1F1B: each of the m + pp − 1 stage-times stretched by its own busy ranks over 2 processors
    # (1, 2, 3, 4 × 5, 3, 2, 1 busy: 1, 1, 1.5, 2 × 5, 1.5, 1, 1), between the critical path and the total work
    contention = compute_contention(MEASURED, pp=4, microbatches=8, schedule="1f1b")
    assert (8 + 3) * contention == pytest.approx(17)
    assert 8 + 3 < (8 + 3) * contention < 8 + 3 + 8 * 4 / 2
    # few microbatches, at most 2 ranks busy at once: no slowdown
    assert compute_contention(MEASURED, pp=4, microbatches=2, schedule="gpipe") == 1.0
    # ... but above the processors in some stage-times: those stretch, though the mean busy count (1.6) is below 1.7
    tight = replace(MEASURED, compute_concurrency=1.7)
    assert compute_contention(tight, pp=4, microbatches=2, schedule="gpipe") == pytest.approx((2 + 3 * 2 / 1.7) / 5)
    # interleaved: m·v + pp − 1 stage-times of T/v each; pp = 2 of 4 ranks: 2 ranks per stage (1, 2, 2, 2, 1 stages)
    assert compute_contention(MEASURED, pp=2, microbatches=2, schedule="interleaved", virtual_stages=2) == \
        pytest.approx((1 + 2 + 2 + 2 + 1) / 5)
    assert compute_contention(CPU, pp=1, microbatches=4, schedule="1f1b") == 1.0  # a device per rank


def test_per_step_costs_are_spread_over_microbatches():
    kwargs = dict(dp=4, stride=1, precision="fp32", pp=1)
    plain = layer_step_overhead_s(MEASURED, param_tensors=12, dtensor=False, fsdp_unit=False, microbatches=4, **kwargs)
    assert plain == pytest.approx(12 * 1e-5 / 4)
    # an FSDP unit: DTensor optimizer launches + its all-gather and reduce-scatter latencies (one gather: m > 1)
    unit = layer_step_overhead_s(MEASURED, param_tensors=12, dtensor=True, fsdp_unit=True, microbatches=4, **kwargs)
    assert unit == pytest.approx((12 * 1e-4 + 2e-3 + 2.5e-3) / 4)
    # ranks sharing processors stretch the optimizer's launches (the rank's compute), not the collectives'
    # latencies, which are measured with every rank taking part
    shared = layer_step_overhead_s(MEASURED, param_tensors=12, dtensor=True, fsdp_unit=True, microbatches=4,
                                   contention=2.0, **kwargs)
    assert shared == pytest.approx((2 * 12 * 1e-4 + 2e-3 + 2.5e-3) / 4)
    graph = gpt_like_graph(layers=2, hidden=64, seq=16, heads=4, vocab=100)
    block, strategy = graph.layer("blocks.0"), Strategy(1, 4, 1, 1, 4, "1f1b", "fsdp", precision="fp32")
    contention, _, per_step_s = layer_cost_context(graph, block, MEASURED, strategy, False)
    bare = layer_choice_cost(graph, block, MEASURED, strategy, False, None, (contention, 4, 0.0))
    with_step = layer_choice_cost(graph, block, MEASURED, strategy, False, None, (contention, 4, per_step_s))
    assert contention == 2.0 and with_step.backward_s - bare.backward_s == pytest.approx(per_step_s)
    assert layer_step_overhead_s(Cluster.preset("a100-80gb"), param_tensors=12, dtensor=True, fsdp_unit=False,
                                 microbatches=1, **kwargs) == 0.0


def test_measured_figures_survive_json_and_presets_write_none_of_them():
    again = Cluster.from_dict(json.loads(json.dumps(MEASURED.to_dict())))
    assert again == MEASURED and hash(again) == hash(MEASURED)
    assert again.to_dict()["collective_times"]["all_reduce"]["2"][0] == [1e3, 1e-3]
    for name in ("a100-80gb", "cpu"):
        data = Cluster.preset(name).to_dict()
        assert not {"collective_times", "compute_concurrency"} & set(data)
        assert not {"matmul_efficiency", "tp_layer_overhead_s", "optimizer_tensor_overhead_s"} & set(data["device"])
    with pytest.raises(ValueError, match="collective_times"):
        replace(CPU, collective_times={"all_reduce": {"2": [[1e3, -1.0]]}})
    with pytest.raises(ValueError, match="matmul_efficiency"):
        replace(CPU.device, matmul_efficiency={"fp32": [[1e3, 2.0]]})


def test_calibration_helpers():
    assert monotone([3.0, 1.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # a larger message never takes less time
    assert overlap_fraction(0.1, 0.3, 0.3) == 1.0 and overlap_fraction(0.1, 0.3, 0.4) == 0.0


GROUPED = replace(MEASURED, device=replace(MEASURED.device, layer_overhead_s=1e-4,
                                           group_layer_overhead={"tp": {"2": 2e-3, "4": 1e-3}, "fsdp": {"2": 4e-4}}))


def test_wrapper_overheads_are_read_at_the_layout_s_own_group_size():
    graph = gpt_like_graph(layers=2, hidden=64, seq=16, heads=4, vocab=100)
    block = graph.layer("blocks.0")
    flat = replace(GROUPED, device=replace(GROUPED.device, group_layer_overhead=()))

    def overhead_s(cluster, dp, tp, kind):
        # forward seconds less those of the same layer with no fixed overheads: o (× contention 2)
        strategy = Strategy(1, dp, tp, 1, 1, "1f1b", kind, precision="fp32")
        bare = replace(cluster, device=replace(cluster.device, layer_overhead_s=0.0, tp_layer_overhead_s=0.0,
                                               fsdp_layer_overhead_s=0.0, group_layer_overhead=()))
        return (layer_choice_cost(graph, block, cluster, strategy, tp > 1, None).forward_s
                - layer_choice_cost(graph, block, bare, strategy, tp > 1, None).forward_s) / 2

    assert overhead_s(GROUPED, 1, 4, "ddp") == pytest.approx(1e-4 + 1e-3)
    assert overhead_s(GROUPED, 2, 2, "ddp") == pytest.approx(1e-4 + 2e-3)  # tp = 2: its own, larger figure
    assert overhead_s(GROUPED, 2, 2, "fsdp") == pytest.approx(1e-4 + 2e-3 + 4e-4)  # an FSDP unit of 2 ranks
    # FSDP over 4 ranks has no point of its own: the nearest measured size (2), clamped
    assert overhead_s(GROUPED, 4, 1, "fsdp") == pytest.approx(1e-4 + 4e-4)
    # without a table: the size-free figures, whatever the group
    assert overhead_s(flat, 2, 2, "fsdp") == pytest.approx(1e-4 + 1e-3 + 5e-4)
    assert layer_cost_context(graph, block, GROUPED, Strategy(1, 2, 2, 1, 1, "1f1b", "fsdp"), True)[1] == 2


def test_fsdp_units_that_keep_their_weights_and_stage_roots_pay_their_own_measured_hooks():
    from autoplan.cost import data_parallel_root_s
    from autoplan.cost.plan_cost import rank_tail_s, rank_tail_terms

    graph = gpt_like_graph(layers=2, hidden=64, seq=16, heads=4, vocab=100)
    block = graph.layer("blocks.0")
    hooks = replace(GROUPED, device=replace(GROUPED.device, group_layer_overhead={
        "tp": {"2": 2e-3}, "fsdp": {"2": 4e-4}, "fsdp_keep": {"2": 1e-4}, "replicate": {"2": 3e-4}}))

    def forward_s(cluster, microbatches, pp=1):
        strategy = Strategy(pp, 2, 1, 1, microbatches, "1f1b", "fsdp", precision="fp32")
        return layer_choice_cost(graph, block, cluster, strategy, False, None).forward_s

    # one microbatch: the unit reshards after forward (ZeRO-3); several: it keeps its weights, the cheaper hooks
    assert forward_s(hooks, 1) - forward_s(GROUPED, 1) == pytest.approx(0.0)
    assert forward_s(hooks, 4) - forward_s(GROUPED, 4) == pytest.approx(2.0 * (1e-4 - 4e-4))
    # a cluster measured before "fsdp_keep" existed prices both as "fsdp", as before
    assert forward_s(GROUPED, 4) - forward_s(GROUPED, 1) == pytest.approx(0.0)
    # a layer owning a tied weight (a GPT's token embedding) stays with the stage root, as the executor does
    big = replace(graph.layer("tok"), num_params=block.num_params, param_names=("tok.weight",))
    tied = replace(graph, layers=[big if l.name == "tok" else l for l in graph.layers],
                   tied_parameters=(("tok.weight", "head.weight"),))
    fsdp = Strategy(1, 2, 1, 1, 1, "1f1b", "fsdp", precision="fp32")
    assert layer_cost_context(graph, replace(big, param_names=()), hooks, fsdp, False)[1] == 2
    assert layer_cost_context(tied, big, hooks, fsdp, False)[1] == 0
    # the stage roots: replicate() under pp × DDP, (m·v + pp − 1) stage-times of 3 forward-equivalents, contended
    contention = compute_contention(hooks, pp=2, microbatches=4, schedule="1f1b")
    root = data_parallel_root_s(hooks, dp=2, data_parallel="ddp", tp=1, pp=2, microbatches=4, schedule="1f1b")
    assert root == pytest.approx((4 + 1) * 3 * 3e-4 * contention)
    assert data_parallel_root_s(hooks, dp=4, data_parallel="ddp", tp=1, pp=1, microbatches=4,
                                schedule="1f1b") == 0.0  # classic DDP: no FSDP2 root
    assert data_parallel_root_s(GROUPED, dp=2, data_parallel="ddp", tp=1, pp=2, microbatches=4,
                                schedule="1f1b") == 0.0  # not measured: not charged, as before
    # it is a per-step constant of the layout: the tail (and so the solver's α) carries it, whatever the rank holds
    s = Strategy(2, 2, 1, 1, 4, "1f1b", "ddp", precision="fp32")
    alpha_s, beta_s = rank_tail_terms(s, hooks)
    assert alpha_s - rank_tail_terms(s, GROUPED)[0] == pytest.approx(root)
    assert sum(rank_tail_s(s, hooks, 10**6)) == pytest.approx(alpha_s + beta_s * 10**6)


def test_ddp_s_sync_is_priced_as_its_wrapper_runs_it_in_a_step_where_measured():
    from autoplan.cost import data_parallel_sync_s

    ddp_line = {**TABLE, "ddp_all_reduce": {"4": [[1e3, 5e-3], [1e6, 30e-3]]}}
    measured = replace(MEASURED, collective_times=ddp_line)

    def sync(cluster, **layout):
        return data_parallel_sync_s(10**6, cluster, data_parallel="ddp", precision="fp32", **layout)

    # DistributedDataParallel itself (no tp, no pp): its buckets and copies as measured, 4 MB of gradients
    slope = (30e-3 - 5e-3) / (1e6 - 1e3)
    assert sync(measured, dp=4, stride=1) == pytest.approx(30e-3 + slope * (4e6 - 1e6))
    assert sync(MEASURED, dp=4, stride=1) == pytest.approx(12e-3 + (12e-3 - 3e-3) / (1e6 - 1e3) * 3e6)
    # composed with tp or pp the executor runs replicate(): its own line, and the all-reduce's where not measured
    assert sync(measured, dp=2, stride=2) == sync(MEASURED, dp=2, stride=2)
    assert sync(measured, dp=4, stride=1, pp=2) == sync(MEASURED, dp=4, stride=1, pp=2)
    replicated = replace(measured, collective_times={**ddp_line, "replicate_all_reduce": {"4": [[1e3, 1e-3],
                                                                                               [1e6, 2e-3]]}})
    assert sync(replicated, dp=4, stride=1, pp=2) == pytest.approx(2e-3 + (1e-3 / (1e6 - 1e3)) * 3e6)
    assert sync(replicated, dp=4, stride=1) == sync(measured, dp=4, stride=1)
    # a group size with no measured line falls back to the all-reduce's
    assert sync(measured, dp=2, stride=1) == sync(MEASURED, dp=2, stride=1)
    assert json.loads(json.dumps(measured.to_dict())) == measured.to_dict()
    assert Cluster.from_dict(measured.to_dict()) == measured


def test_fsdp_s_collectives_are_priced_as_they_run_between_its_units_where_measured():
    from autoplan.cost import data_parallel_sync_terms, fsdp_unit_collective_s

    in_step = {**TABLE, "fsdp_all_gather": {"4": [[2.5e5, 6e-3], [1e6, 9e-3]]},
               "fsdp_reduce_scatter": {"4": [[2.5e5, 7e-3], [1e6, 10e-3]]}}
    measured = replace(MEASURED, collective_times=in_step)
    gather_slope, gather_latency = 3e-3 / 7.5e5, 6e-3 - 2.5e5 * 3e-3 / 7.5e5
    # one unit's collective: the in-step line (its intercept is the unit's latency), else the plain collective
    assert fsdp_unit_collective_s(measured, "all_gather", 0, 4, 1) == pytest.approx(gather_latency)
    assert fsdp_unit_collective_s(measured, "all_gather", 5e5, 4, 1) == pytest.approx(7e-3)
    assert fsdp_unit_collective_s(MEASURED, "all_gather", 0, 4, 1) == 2e-3  # the smallest message measured
    assert fsdp_unit_collective_s(MEASURED, "reduce_scatter", 1e6, 4, 1) == pytest.approx(6e-3)
    assert fsdp_unit_collective_s(measured, "all_gather", 5e5, 2, 1) == fsdp_unit_collective_s(
        MEASURED, "all_gather", 5e5, 2, 1)  # no line at that group size
    with pytest.raises(ValueError, match="all_gather and reduce_scatter"):
        fsdp_unit_collective_s(measured, "all_reduce", 0, 4, 1)
    # each unit pays its latency per step, the step's sync its bytes at the in-step slopes
    kwargs = dict(param_tensors=4, dtensor=False, fsdp_unit=True, dp=4, stride=1, precision="fp32", microbatches=1,
                  pp=1)
    assert layer_step_overhead_s(measured, **kwargs) - layer_step_overhead_s(MEASURED, **kwargs) == pytest.approx(
        2 * (gather_latency - 2e-3) + (10e-3 - 1e6 * 3e-3 / 7.5e5) - 2.5e-3)
    fsdp = dict(dp=4, stride=1, data_parallel="fsdp", precision="fp32")
    latency_s, per_param_s = data_parallel_sync_terms(measured, **fsdp)
    plain_latency_s, _ = data_parallel_sync_terms(MEASURED, **fsdp)
    assert latency_s == plain_latency_s
    assert per_param_s == pytest.approx(2 * 4 * gather_slope + 4 * 3e-3 / 7.5e5)  # fp32 weights and gradients
    assert data_parallel_sync_terms(measured, dp=4, stride=1, data_parallel="ddp", precision="fp32") == \
        data_parallel_sync_terms(MEASURED, dp=4, stride=1, data_parallel="ddp", precision="fp32")
    assert Cluster.from_dict(measured.to_dict()) == measured


def test_the_optimizer_step_runs_at_its_measured_rate_and_is_stretched_like_the_rank_s_compute():
    from autoplan.cost import optimizer_param_s, optimizer_step_s
    from autoplan.cost.plan_cost import rank_tail_s, rank_tail_terms

    measured = replace(MEASURED, device=replace(MEASURED.device, optimizer_param_s=6e-9))
    assert optimizer_step_s(10**6, measured, "fp32", "adamw") == pytest.approx(6e-3)
    assert optimizer_param_s(measured, "bf16", "sgd") == pytest.approx(6e-9 * 20 / 28)  # fp32 states: SGD's bytes
    fused_s = 28e6 / MEASURED.device.memory_bandwidth_Bps  # not measured: the fused kernel's bytes
    assert optimizer_step_s(10**6, MEASURED, "fp32", "adamw") == pytest.approx(fused_s)
    ddp, fsdp = (Strategy(1, 4, 1, 1, 2, "1f1b", kind, precision="fp32") for kind in ("ddp", "fsdp"))
    contention = compute_contention(measured, pp=1, microbatches=2, schedule="1f1b")
    assert contention == 2.0  # 4 ranks, concurrency 2
    assert rank_tail_s(ddp, measured, 10**6)[1] == pytest.approx(6e-3 * contention)
    assert rank_tail_s(fsdp, measured, 10**6)[1] == pytest.approx(6e-3 * contention / 4)  # its shard only
    # every rank steps at once after its pipeline has drained: all busy, whatever the pipeline's average
    piped = Strategy(4, 1, 1, 1, 2, "1f1b", "ddp", precision="fp32")
    assert compute_contention(measured, pp=4, microbatches=2, schedule="1f1b") == 1.0
    assert rank_tail_s(piped, measured, 10**6)[1] == pytest.approx(6e-3 * contention)
    for s in (ddp, fsdp, piped):  # the solver's line carries the same factor
        alpha_s, beta_s = rank_tail_terms(s, measured)
        assert sum(rank_tail_s(s, measured, 10**6)) == pytest.approx(alpha_s + beta_s * 10**6)
    # one device per rank (the presets): no stretch
    gpu = Cluster.preset("a100-80gb")
    assert rank_tail_s(ddp, gpu, 10**9)[1] == pytest.approx(optimizer_step_s(10**9, gpu, "fp32", "adamw"))


def test_a_recompute_pays_the_checkpoint_s_measured_fixed_time_stretched_like_compute():
    graph = gpt_like_graph(layers=1, hidden=64, seq=16, heads=4, vocab=100)
    block = graph.layer("blocks.0")
    (option,) = [o for o in block.recompute_options if o.module == block.name] or block.recompute_options[:1]
    s = Strategy(1, 4, 1, 1, 1, "1f1b", "ddp")
    hooks = replace(MEASURED, device=replace(MEASURED.device, recompute_overhead_s=2e-3))
    bare, with_hooks = (layer_choice_cost(graph, block, c, s, False, option) for c in (MEASURED, hooks))
    contention = s.contention(MEASURED)
    assert contention == 2.0 and with_hooks.recompute_s - bare.recompute_s == pytest.approx(2e-3 * contention)
    assert with_hooks.forward_s == bare.forward_s and with_hooks.backward_s == bare.backward_s
    assert layer_choice_cost(graph, block, hooks, s, False, None).recompute_s == 0.0  # no recompute, no hooks


def test_the_pipeline_runtime_is_paid_per_stage_time_and_the_calibration_gives_its_pipeline_back():
    from autoplan.calibrate import pipeline_stage_overhead_from_s
    from autoplan.cost import pipeline_runtime_s, stage_times_per_step
    from autoplan.cost.plan_cost import rank_tail_s, rank_tail_terms

    runtime = replace(GROUPED, device=replace(GROUPED.device, pipeline_stage_overhead_s=1e-3))
    for pp, m, v in ((2, 4, 1), (4, 8, 2)):
        schedule = "interleaved" if v > 1 else "1f1b"
        contention = compute_contention(runtime, pp=pp, microbatches=m, schedule=schedule, virtual_stages=v)
        charged = pipeline_runtime_s(runtime, pp=pp, microbatches=m, schedule=schedule, virtual_stages=v)
        assert charged == pytest.approx((m * v + pp - 1) * 1e-3 * contention)
        assert stage_times_per_step(pp, m, v) == m * v + pp - 1
        # a per-step constant of the layout: in the tail, so in the solver's α as well as in estimate()
        s = Strategy(pp, 1, 1, 1, m, schedule, "ddp", virtual_stages=v, precision="fp32")
        assert rank_tail_terms(s, runtime)[0] - rank_tail_terms(s, GROUPED)[0] == pytest.approx(charged)
        assert sum(rank_tail_s(s, runtime, 10**6)) - sum(rank_tail_s(s, GROUPED, 10**6)) == pytest.approx(charged)
    assert pipeline_runtime_s(runtime, pp=1, microbatches=8, schedule="1f1b") == 0.0  # no pipeline
    assert pipeline_runtime_s(GROUPED, pp=4, microbatches=8, schedule="1f1b") == 0.0  # not measured
    # the figure calibrate derives from a 2-stage pipeline's makespan prices that pipeline back at its makespan
    m, stage_s, sends_s = 8, 2e-3, 4e-4
    contention = compute_contention(runtime, pp=2, microbatches=m, schedule="1f1b")
    makespan_s = 0.08
    f = pipeline_stage_overhead_from_s(makespan_s, m, stage_s, sends_s, contention)
    assert (m + 1) * (stage_s * contention + sends_s) + (m + 1) * f * contention == pytest.approx(makespan_s)
    assert pipeline_stage_overhead_from_s(1e-3, m, stage_s, sends_s, contention) == 0.0  # never negative


def test_group_overheads_come_from_the_tiny_block_s_time_at_each_size():
    # the block's forward + backward at tp = 2 and 4 (every rank busy) less its collectives at that size, over
    # the contention, a third, less the plain block: the cost model then gives each size its measured time back
    table = group_overheads_s({"tp2": 0.060, "tp4": 0.066}, {"tp2": 0.006, "tp4": 0.030}, contention=2.0,
                              plain_s=0.002)
    assert table == {"tp": {2: pytest.approx(0.007), 4: pytest.approx(0.004)}}
    assert group_overheads_s({"fsdp4": 0.001}, {"fsdp4": 0.002}, 2.0, 0.001) == {"fsdp": {4: 0.0}}  # never < 0
    again = Cluster.from_dict(json.loads(json.dumps(GROUPED.to_dict())))
    assert again == GROUPED and hash(again) == hash(GROUPED)
    assert again.to_dict()["device"]["group_layer_overhead"]["tp"] == {"2": 2e-3, "4": 1e-3}
    with pytest.raises(ValueError, match="group_layer_overhead"):
        replace(CPU.device, group_layer_overhead={"ddp": {"2": 1e-3}})
    with pytest.raises(ValueError, match="group size"):
        replace(CPU.device, group_layer_overhead={"tp": {"1": 1e-3}})


def test_interleaved_measurements_outvote_a_load_spike_and_repeat_while_they_disagree():
    calls = []

    def figure(values):
        values = iter(values)
        return lambda: calls.append(1) or next(values)

    # one sample of "a" hit by a spike: its median ignores it, and no round is added (spread 0)
    medians, spread = interleaved_medians({"a": figure([1.0, 8.0, 1.0]), "b": figure([2.0, 2.0, 2.1])})
    assert medians == {"a": 1.0, "b": 2.0} and len(calls) == 6 and spread["a"] == 0.0
    # samples that disagree get more rounds (of every figure, still interleaved), up to the limit
    calls.clear()
    medians, spread = interleaved_medians({"a": figure([1.0, 2.0, 3.0, 2.0, 2.0])}, rounds=3, extra_rounds=2)
    assert medians == {"a": 2.0} and len(calls) == 5 and spread["a"] == 0.0
    with pytest.raises(ValueError, match="rounds"):
        interleaved_medians({"a": figure([1.0])}, rounds=0)
