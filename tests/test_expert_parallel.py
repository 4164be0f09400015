"""Expert parallelism: the routed experts of a MoE model sharded over the data-parallel ranks.

Quick tier: pricing (memory, gradient sync, dispatch collectives, under DDP and FSDP), the plan field and option,
every refusal, and the planner's choice with and without the experts sharded, on a hand-written toy MoE (torch.fx
traces it in milliseconds) and synthetic graphs. Slow tier: one world of 2 gloo ranks trains tiny Mixtral
(grouped_mm experts, with a checkpoint and state-dict round trip; by DDP, then with FSDP for the dense part; by DDP
with one layer routing no token to rank 1's experts, grouped_mm and eager) and
Qwen2-MoE (eager experts by DDP, built on meta and loaded; its default experts by FSDP resharding per microbatch)
under dp2 + ep2 against one process, checks that each rank holds E/2 experts and counts the collectives issued
against the cost model's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch
from torch import nn

import autoplan
from autoplan.cost.experts import dispatch_collectives, expert_params
from autoplan.cost.plan_cost import estimate_breakdown
from autoplan.execute.experts import check_expert_parallel, expert_modules
from autoplan.execute.manual import manual_plan
from autoplan.graph import ExpertsLayer
from autoplan.options import PlanOptions
from autoplan.plan import Mesh, ModelInfo
from autoplan.solve import search
from autoplan.solve.experts import plan_with_expert_parallel, search_expert_parallel
from autoplan.synthetic import mlp_graph

E, K, H, I, T = 4, 2, 16, 24, 8  # experts, top-k, hidden, expert width, tokens per sample
EP = 2  # ranks of the slow world


class Experts(nn.Module):
    """transformers' experts interface (3-D gate_up_proj / down_proj, called with top-k indices and weights),
    computed densely so that torch.fx traces it."""

    def __init__(self, experts: int):
        super().__init__()
        self.num_experts = experts
        self._is_expert_parallel = False
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * I, H) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(experts, H, I) * 0.1)

    def forward(self, x, index, weights):
        gate, up = torch.einsum("th,eih->tei", x, self.gate_up_proj).chunk(2, dim=-1)
        out = torch.einsum("tei,ehi->teh", nn.functional.silu(gate) * up, self.down_proj)
        mix = (nn.functional.one_hot(index, self.num_experts).to(x.dtype) * weights.unsqueeze(-1)).sum(1)  # [T, E]
        return (out * mix.unsqueeze(-1)).sum(1)


class MoE(nn.Module):
    def __init__(self, experts: int):
        super().__init__()
        self.top_k = K
        self.gate = nn.Linear(H, experts, bias=False)
        self.experts = Experts(experts)

    def forward(self, x):
        flat = x.reshape(-1, H)
        weights, index = torch.topk(self.gate(flat).softmax(-1), K, dim=-1)
        return x + self.experts(flat, index, weights).reshape(x.shape)


def toy(experts: int = E) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(H, H), MoE(experts), MoE(experts), nn.Linear(H, H))


def test_trace_records_the_routed_experts_per_layer():
    graph = autoplan.trace(toy(), torch.randn(2, T, H))
    assert sorted(graph.experts) == ["1", "2"]
    e = graph.experts["1"]
    assert (e.modules, e.num_experts, e.top_k, e.tokens, e.hidden, e.names) == (1, E, K, 2 * T, H, ("1.experts",))
    assert e.num_params == E * 3 * I * H == expert_params(graph, ["1"])


def _plan(ep: int = 1, dp: int = 4, microbatches: int = 2, recompute: tuple = ()):
    """A dp-only DDP plan over a synthetic two-layer graph whose first layer holds 8 experts (400k weights)."""
    graph = mlp_graph(widths=(256, 1024, 256), batch=32)
    graph.experts = {"layers.0": ExpertsLayer(1, 8, 2, 400_000, tokens=32, hidden=256, names=("layers.0",))}
    plan = autoplan.Plan(
        model=ModelInfo("MLP", graph.fingerprint, graph.num_params),
        cluster=autoplan.Cluster.preset("a100-80gb", devices_per_node=dp), global_batch_size=32,
        microbatch_size=32 // dp // microbatches, microbatches=microbatches, mesh=Mesh(dp=dp), schedule="1f1b",
        data_parallel="ddp", stages=(autoplan.Stage(("layers.0", "layers.1"), recompute),), expert_parallel=ep)
    return graph, plan


def test_pricing_divides_the_experts_state_and_adds_the_dispatch():
    graph, off = _plan()
    on = off.replace(expert_parallel=4)
    a, b = estimate_breakdown(graph, off), estimate_breakdown(graph, on)
    ra, rb = a.ranks[0], b.ranks[0]
    assert ra.num_params - rb.num_params == 300_000  # 3/4 of the experts are held by the other ranks
    per_param = autoplan.cost.state_bytes_per_param("bf16", "adamw").total
    assert ra.model_state_bytes - rb.model_state_bytes == 300_000 * per_param
    assert rb.dp_sync_s < ra.dp_sync_s  # the experts' gradients leave the all-reduce
    assert rb.compute_s == ra.compute_s  # even routing: the same FLOPs per rank
    # per microbatch: 4 all-gathers and 3 reduce-scatters of the group's tokens (4 ranks × 8 samples × 32/32...)
    got = dispatch_collectives(graph, "layers.0", 4, on.microbatch_size)
    assert sum(c.count for c in got if c.kind == "all_gather") == 4
    assert sum(c.count for c in got if c.kind == "reduce_scatter") == 3
    tokens_bytes = 4 * on.microbatch_size * 256 * graph.dtype_bytes  # 32 tokens per sample / batch 32: 1 each
    assert got[0].nbytes == tokens_bytes and got[3].nbytes == tokens_bytes
    dispatch_s = rb.tp_comm_s - ra.tp_comm_s
    assert dispatch_s > 0
    assert b.step_time_s == pytest.approx(a.step_time_s + on.microbatches * dispatch_s + rb.tail_s - ra.tail_s)
    # a recomputed experts module gathers its tokens, weights and indices again
    again = dispatch_collectives(graph, "layers.0", 4, on.microbatch_size, recomputed=True)
    assert sum(c.count for c in again) == sum(c.count for c in got) + 4
    assert estimate_breakdown(graph, _plan(4, recompute=("layers.0",))[1]).ranks[0].tp_comm_s > rb.tp_comm_s


def test_pricing_under_fsdp_leaves_the_experts_out_of_fsdp():
    from autoplan.cost.plan_cost import Strategy, rank_state_bytes

    graph, ddp = _plan()  # 2 microbatches: FSDP keeps each unit's gathered weights and gradients through a step
    off = ddp.replace(data_parallel="fsdp", precision="bf16")
    on = off.replace(expert_parallel=4)
    a, b = estimate_breakdown(graph, off), estimate_breakdown(graph, on)
    ra, rb = a.ranks[0], b.ranks[0]
    experts, dense = 400_000, ra.num_params - 400_000
    assert rb.num_params == ra.num_params  # before FSDP's sharding: the experts' 1/ep is its 1/dp
    per_param = autoplan.cost.state_bytes_per_param("bf16", "adamw").total
    # the dense part as FSDP holds it (sharded, plus what it keeps unsharded through the step); the experts 1/ep
    assert rb.model_state_bytes == rank_state_bytes(Strategy.of(on), dense) + experts // 4 * per_param
    assert rb.model_state_bytes < ra.model_state_bytes  # FSDP no longer keeps the experts gathered
    assert rb.dp_sync_s < ra.dp_sync_s  # FSDP gathers and reduce-scatters the dense weights only
    assert rb.transient_bytes < ra.transient_bytes  # the layer's gathered weights: its dense ones
    assert rb.weight_copy_bytes == ra.weight_copy_bytes + experts // 4 * 2  # the local experts cast to bf16
    assert rb.compute_s == ra.compute_s
    assert b.fits and b.step_time_s > 0


def test_plan_field_is_additive_and_validated():
    graph, plan = _plan(ep=4)
    d = plan.to_dict()
    assert d["expert_parallel"] == 4 and autoplan.Plan.from_dict(d) == plan
    assert "expert_parallel" not in plan.replace(expert_parallel=1).to_dict()  # plans before it read as 1
    with pytest.raises(ValueError, match="expert_parallel=3 must be a positive int dividing dp=4"):
        plan.replace(expert_parallel=3)
    with pytest.raises(ValueError, match="expert_parallel must be 'auto', True or False"):
        autoplan.plan(nn.Linear(2, 2), torch.randn(2, 2), expert_parallel="yes")
    with pytest.raises(ValueError, match=r"expert_parallel=True runs with data parallelism alone \(tp = pp = 1"):
        autoplan.plan(nn.Linear(2, 2), torch.randn(2, 2), mesh={"tp": 2}, expert_parallel=True)


def test_executor_refuses_what_it_cannot_run_before_changing_the_model():
    model = toy()
    plan = manual_plan(model, [[""]], dp=4, global_batch_size=8).replace(expert_parallel=4)
    check_expert_parallel(model, plan)  # runs: 4 experts over 4 ranks
    with pytest.raises(autoplan.PlanMismatchError, match="has no experts module"):
        check_expert_parallel(nn.Linear(2, 2), manual_plan(nn.Linear(2, 2), [[""]], dp=4, global_batch_size=8)
                              .replace(expert_parallel=4))
    wide = manual_plan(model, [[""]], dp=8, global_batch_size=8).replace(expert_parallel=8)
    with pytest.raises(autoplan.PlanMismatchError, match="has 4 experts, which ep=8 ranks cannot share evenly"):
        check_expert_parallel(model, wide)
    check_expert_parallel(model, manual_plan(model, [[""]], dp=4, global_batch_size=8, data_parallel="fsdp")
                          .replace(expert_parallel=4))  # FSDP for the dense part
    for other in (manual_plan(model, [[""]], dp=2, tp=2, global_batch_size=8).replace(expert_parallel=2),
                  manual_plan(model, [["0", "1"], ["2", "3"]], dp=2, pp=2, global_batch_size=8,
                              microbatches=2).replace(expert_parallel=2),
                  manual_plan(model, [[""]], dp=4, global_batch_size=8).replace(expert_parallel=2)):
        with pytest.raises(autoplan.PlanMismatchError, match="expert parallelism runs only with dp only"):
            check_expert_parallel(model, other)
    del model[1].experts._is_expert_parallel  # an experts module that would not skip other ranks' experts
    with pytest.raises(autoplan.PlanMismatchError, match="does not take transformers' expert-parallel routing"):
        check_expert_parallel(model, plan)
    assert len(expert_modules(model)) == 2 and model[1].experts.gate_up_proj.shape[0] == E  # untouched


def test_planner_shards_the_experts_when_asked_or_when_faster():
    model, x = toy(), torch.randn(8, T, H)
    cluster = autoplan.Cluster.preset("a100-80gb", devices_per_node=4)
    graph = autoplan.trace(model, x)
    on = autoplan.plan(model, x, cluster=cluster, precision="fp32", expert_parallel=True)
    assert (on.expert_parallel, on.mesh.dp, on.mesh.tp, on.mesh.pp) == (4, 4, 1, 1)
    assert "experts sharded over the 4 dp ranks" in str(on)
    assert on.predicted == estimate_breakdown(graph, on).predicted
    pinned = autoplan.plan(model, x, cluster=cluster, precision="fp32", expert_parallel=True, data_parallel="fsdp")
    assert (pinned.expert_parallel, pinned.data_parallel) == (4, "fsdp")  # FSDP for the dense part
    auto = autoplan.plan(model, x, cluster=cluster, precision="fp32", expert_parallel="auto")
    off = autoplan.plan(model, x, cluster=cluster, precision="fp32")
    assert "expert parallelism (ep=4, " in auto.search.notes[-1]
    assert (auto.expert_parallel == 4) == (on.predicted.step_time_s < off.predicted.step_time_s)
    three = _moe_graph(experts=3)
    options = PlanOptions(global_batch_size=32, expert_parallel=True)
    with pytest.raises(ValueError, match="ep = dp = 4 does not divide the 3 experts"):
        plan_with_expert_parallel(three, cluster, options, search)
    plain = plan_with_expert_parallel(three, cluster, replace(options, expert_parallel="auto"), search)
    assert plain.expert_parallel == 1 and "expert parallelism not used: ep = dp = 4" in plain.search.notes[-1]


def _moe_graph(width: int = 4096, share: float = 0.95, tokens: int = 32, experts: int = 8):
    """A synthetic two-layer graph whose layers hold ``share`` of their weights in ``experts`` experts each (no
    tensor-parallel group: the planner cannot shard them by TP), called with ``tokens`` tokens per batch of 32."""
    graph = mlp_graph(widths=(width, width, width), batch=32)
    graph.layers = [replace(layer, tp_groups=()) for layer in graph.layers]
    graph.experts = {layer.name: ExpertsLayer(1, experts, 2, int(layer.num_params * share), tokens=tokens,
                                              hidden=width, names=(layer.name,)) for layer in graph.layers}
    return graph


def _small_devices(mib: int, nodes_of: int = 4) -> autoplan.Cluster:
    base = autoplan.Cluster.preset("a100-80gb", devices_per_node=nodes_of)
    return replace(base, device=replace(base.device, memory_bytes=mib * 2**20, memory_headroom_bytes=0))


def test_auto_finds_a_layout_that_fits_only_with_the_experts_sharded():
    # 2 layers of 16.8 M weights, 95% in experts, bf16 + AdamW by DDP on 4 devices of 200 MiB: a replica needs
    # 537 MB of model states, a pipeline stage 268 MB; with the experts over 4 ranks, 155 MB
    graph, cluster = _moe_graph(), _small_devices(200)
    options = PlanOptions(global_batch_size=32, data_parallel="ddp", expert_parallel="auto")
    with pytest.raises(autoplan.InfeasiblePlanError):
        search(graph, cluster, options)
    plan = plan_with_expert_parallel(graph, cluster, options, search)
    assert (plan.expert_parallel, plan.mesh.dp, plan.data_parallel) == (4, 4, "ddp")
    assert plan.predicted == estimate_breakdown(graph, plan).predicted and estimate_breakdown(graph, plan).fits
    assert "without it no layout fits: chosen" in plan.search.notes[-1]
    with pytest.raises(autoplan.InfeasiblePlanError, match="no dp-only layout with the experts sharded fits"):
        plan_with_expert_parallel(graph, _small_devices(100), replace(options, expert_parallel=True), search)


def test_layouts_with_experts_sharded_recompute_only_what_they_must():
    graph, big = _moe_graph(width=2048, share=0.9), 400 << 20  # 400 MiB of activations per layer and batch of 32
    graph.layers = [replace(layer, activation_bytes=big, recompute_options=tuple(
        replace(o, saved_activation_bytes=big) for o in layer.recompute_options)) for layer in graph.layers]
    options = PlanOptions(global_batch_size=32, data_parallel="ddp", microbatch_size=8)
    roomy = search_expert_parallel(graph, _small_devices(200), options).plan
    tight = search_expert_parallel(graph, _small_devices(120), options).plan
    assert roomy.recompute == () and tight.recompute == ("layers.0", "layers.1")
    assert tight.predicted.step_time_s > roomy.predicted.step_time_s
    assert max(tight.predicted.peak_memory_bytes) <= 120 << 20 < max(roomy.predicted.peak_memory_bytes)
    found = search_expert_parallel(graph, _small_devices(60), options)
    assert found.plan is None and found.least_bytes == max(tight.predicted.peak_memory_bytes)


def test_auto_keeps_the_layout_without_experts_sharded_when_that_is_faster():
    # experts 10% of the weights, 16k tokens per batch: the dispatch moves far more than sharding saves
    graph, cluster = _moe_graph(width=1024, share=0.1, tokens=32 * 512), autoplan.Cluster.preset("a100-80gb",
                                                                                                 devices_per_node=4)
    options = PlanOptions(global_batch_size=32, expert_parallel="auto")
    plan = plan_with_expert_parallel(graph, cluster, options, search)
    off = search(graph, cluster, options)
    ep = search_expert_parallel(graph, cluster, options).plan
    assert ep is not None and ep.predicted.step_time_s > off.predicted.step_time_s
    assert plan.expert_parallel == 1 and (plan.mesh, plan.predicted) == (off.mesh, off.predicted)
    assert plan.search.notes[-1].endswith("not chosen") and f"{ep.predicted.step_time_s:.4g} s" in plan.search.notes[-1]


@pytest.mark.slow
def test_dp2_with_experts_sharded_matches_one_process(tmp_path):
    pytest.importorskip("transformers")
    from distributed_helpers import REPO, run_world

    layers = ["model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    # layer 0 routes every token to rank 0's experts (rank 1 computes nothing there but must issue the same
    # backward collectives), layer 1 to both: grouped_mm experts here, eager ones in the next case
    cases = [{"family": "mixtral", "checkpoint": str(tmp_path / "checkpoint"), "starve": 0},
             {"family": "mixtral", "experts": "eager", "starve": 0},
             {"family": "qwen2_moe", "experts": "eager", "meta": True},  # built on meta, then loaded
             # FSDP for the dense part (a unit per layer, as the planner's), the experts left out of it
             {"family": "mixtral", "data_parallel": "fsdp", "layers": layers,
              "checkpoint": str(tmp_path / "fsdp_checkpoint")},
             # and resharding per microbatch (ZeRO-3 with gradient accumulation), with a shared expert
             {"family": "qwen2_moe", "data_parallel": "fsdp", "fsdp_reshard": "microbatch", "layers": layers},
             {"family": "mixtral", "data_parallel": "fsdp", "planned": True}]  # the planner's layout, traced
    # 2 ranks, not 4: each rank imports transformers (~9 CPU-seconds), and ep = 2 holds 2 of the 4 experts per
    # rank, so the local offsets and the other rank's sentinel pairs are both exercised
    results = run_world(cases, tmp_path, nproc=EP, worker=REPO / "tests" / "ep_worker.py", timeout_s=400)
    # what the cost model charges for a step: 2 MoE layers × 2 microbatches of dispatch, DDP's all-reduce aside
    graph = mlp_graph(widths=(32, 32, 32), batch=8)
    graph.experts = {name: ExpertsLayer(1, 4, 2, 1, tokens=128, hidden=32) for name in ("layers.0", "layers.1")}
    charged: dict = {}
    for name in graph.experts:
        for c in dispatch_collectives(graph, name, ep=EP, microbatch_size=2):
            charged[c.kind] = charged.get(c.kind, 0) + 2 * c.count
    assert charged == {"all_gather": 16, "reduce_scatter": 12}
    for name, got in results.items():
        assert got["losses"] == pytest.approx(got["ref_losses"], rel=1e-5), name
        assert got["grad_rel_diff"] <= 1e-5, name  # the gradients themselves: AdamW would hide a wrong scale
        assert got["missing"] == [] and got["max_weight_diff"] <= 1e-4, (name, got["worst_weight"])
        if got["plan"]["data_parallel"] == "ddp":
            assert got["counts"] == {"all_gather_into_tensor": charged["all_gather"],
                                     "reduce_scatter_tensor": charged["reduce_scatter"]}, name
        assert got["plan"]["expert_parallel"] == EP
        assert len(got["held"]) == 4 and all(shape[0] == 4 // EP for shape in got["held"].values()), got["held"]
        assert all(shape[0] == 4 for shape in got["full_shapes"].values())  # the full state dict is whole
    planned = results["mixtral:default:fsdp:planned"]["plan"]
    assert (planned["expert_parallel"], planned["data_parallel"], planned["search"]["solver"]) == (
        EP, "fsdp", "expert-parallel")
    for name in ("mixtral:default:starved", "mixtral:eager:starved"):
        assert results[name]["starved_grads"] == [0.0] * 4, name  # here and in one process: exactly zero
    for name in ("mixtral:default:starved", "mixtral:default:fsdp"):
        assert results[name]["roundtrip"] == {"checkpoint": 0.0, "state_dict": 0.0, "on_disk": 0.0}, name
    _issued_equal_charged(results["mixtral:default:fsdp"], per_unit={"all_gather": 1, "reduce_scatter": 1})
    _issued_equal_charged(results["qwen2_moe:default:fsdp"], per_unit={"all_gather": 4, "reduce_scatter": 2})
    assert results["qwen2_moe:default:fsdp"]["padding_bytes"] == 2 * 32 * 4  # [1, 32] → [2, 32] in each layer


def _issued_equal_charged(got: dict, per_unit: dict) -> None:
    """Every collective of an EP + FSDP step, counted at the process group, against the cost model's list
    (``autoplan.cost.traffic.plan_collectives``): the dispatch per microbatch, then FSDP's all-gathers and
    reduce-scatters of the dense weights, ``per_unit`` of each per unit and step — the experts' weights in neither —
    and the loss's mean, one 4-byte all-reduce."""
    dispatch = [(kind, nbytes, count * 2, axis) for kind, nbytes, count, axis in got["dispatch"]]  # 2 microbatches
    assert got["charged"][:len(dispatch)] == dispatch
    fsdp, loss = got["charged"][len(dispatch):-1], got["charged"][-1]
    assert {kind: count for kind, _, count, _ in fsdp} == per_unit  # kept through the step, or resharded
    assert loss == ("all_reduce", 4, 1, "dp")
    want_count, want_bytes = Counter(), Counter()
    for kind, nbytes, count, _ in dispatch + [loss]:
        want_count[kind] += count
        want_bytes[kind] += nbytes * count
    for kind, nbytes, count, _ in fsdp:  # the records sum the bytes over units: per unit, the count
        want_count[kind] += count * got["units"]
        want_bytes[kind] += (nbytes + got["padding_bytes"]) * count  # FSDP2 also moves its dim-0 padding
    issued_count, issued_bytes = Counter(), Counter()
    for kind, nbytes in got["counts"]:
        issued_count[kind] += 1
        issued_bytes[kind] += nbytes
    assert (issued_count, issued_bytes) == (want_count, want_bytes)
