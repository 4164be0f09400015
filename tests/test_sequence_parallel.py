"""Sequence parallelism (Korthikanti et al. 2022) off the devices: options, the plan's field and JSON, what the
trace finds, hand-worked prices, and the solver's choice. Numerics against one process run in the executor worlds
(tests/test_execute_distributed.py) and collective counts in tests/test_collective_counts.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoplan
from autoplan.cli import _parser
from autoplan.cost import layer_cost
from autoplan.cost.plan_cost import Strategy, layer_choice_cost
from autoplan.cost.sequence import collectives_s, sequence_parallel_cost
from autoplan.options import PlanOptions
from autoplan.solve import search
from autoplan.solve.space import layer_choices
from autoplan.synthetic import gpt_like_graph, mlp_graph

A100 = autoplan.Cluster.preset("a100-80gb")
A100_4 = autoplan.Cluster.preset("a100-80gb", devices_per_node=4)


def _block_costs(recompute=None):
    """One synthetic GPT block (h = 64, s = 16, a = 4, b = 1, traced in fp32), priced at tp = 2 in fp32."""
    graph = gpt_like_graph(layers=1, hidden=64, seq=16, heads=4, vocab=128)
    block = graph.layer("blocks.0")
    option = None if recompute is None else block.recompute_options[0]
    figures = dict(traced_batch_size=1, traced_dtype_bytes=4, cluster=A100, tp=2, microbatch_size=1,
                   precision="fp32", recompute=option)
    base = layer_cost(block, **figures)
    return block, base, sequence_parallel_cost(block, base, **figures)


def test_activation_bytes_hand_worked():
    # sbh = 16·64 elements = 4096 bytes in fp32; the block saves 34·sbh/2 + 5as²b/2 elements (Eq. 1 at 4 bytes):
    # 79872 bytes, of which the pairs make 10240 (scores) + 11·4096 = 55296 (split by t = 2 under plain TP).
    block, base, sp = _block_costs()
    assert block.activation_bytes == 79872
    assert base.activation_bytes == 79872 - 55296 + 55296 // 2 == 52224
    # Sequence parallelism splits the norms' inputs (4·4096) over t, and the two pairs' first inputs (2·4096) are
    # kept as their shards (Megatron's storage): 52224 − (16384 + 8192)/2 = 39936, the paper's 34sbh/t + 5as²b/t
    # (§4.2.2), half of the block's 79872.
    assert sp.activation_bytes == 52224 - 12288 == 79872 // 2


def test_full_recompute_keeps_the_input_slice():
    block, base, sp = _block_costs(recompute="full")
    assert base.activation_bytes == 4096            # the checkpointed input, whole under plain TP
    assert sp.activation_bytes == 2048              # this rank's slice of it (Table 2, last row: 2sbh/t)
    # the layer's split activations, rematerialised, with the pairs' gathered inputs whole (the checkpoint, not
    # the shard, keeps them while it recomputes: 39936 + 2·4096/2)
    assert sp.transient_bytes == 44032 - 2048


def test_collectives_turn_into_gathers_and_scatters_of_equal_ring_bytes():
    _, base, sp = _block_costs()
    assert sorted((c.kind, c.nbytes, c.count) for c in base.tp_collectives) == [("all_reduce", 4096, 1)] * 4
    # per pair: forward all-gather (before colwise) + reduce-scatter (after rowwise); backward the reverse, and the
    # saved shard of the pair's input gathered again for the colwise weight gradient
    assert sorted((c.kind, c.nbytes, c.count) for c in sp.tp_collectives) == (
        [("all_gather", 4096, 1)] * 6 + [("reduce_scatter", 4096, 1)] * 4)
    regather = [c for c in sp.tp_collectives if c.kind == "all_gather"][:1]
    # AG + RS = AR on a ring (§4.2.2), plus the two gathers again in backward
    assert sp.tp_comm_s == pytest.approx(base.tp_comm_s + 2 * collectives_s(tuple(regather), A100), rel=1e-12)
    assert sp.forward_s < base.forward_s and sp.backward_s < base.backward_s   # norms on 1/t of the tokens


def _counts(cost) -> dict:
    counts = {}
    for c in cost.tp_collectives:
        counts[c.kind] = counts.get(c.kind, 0) + c.count
    return counts


def test_full_recompute_re_gathers_all_but_the_last_scatter():
    # the recomputation gathers each pair's input once; the checkpoint keeps no shard to gather again
    assert _counts(_block_costs(recompute="full")[2]) == {"all_gather": 4 + 2, "reduce_scatter": 4 + 1}


def test_one_gather_per_shared_input():
    """Llama's q, k, v (and gate, up) read one input: one all-gather of it in forward, one reduce-scatter of its
    gradient and one gather again in backward, per pair, whatever the number of colwise linears."""
    from dataclasses import replace

    block, _, _ = _block_costs()
    split = []
    for g in block.tp_groups:
        styles = dict(g.styles)
        for fqn, style in g.styles.items():
            if style == "colwise":
                del styles[fqn]
                styles.update({f"{fqn}_{part}": "colwise" for part in "qkv"})
        split.append(replace(g, styles=styles))
    block = replace(block, tp_groups=tuple(split))
    figures = dict(traced_batch_size=1, traced_dtype_bytes=4, cluster=A100, tp=2, microbatch_size=1, precision="fp32")
    sp = sequence_parallel_cost(block, layer_cost(block, **figures), **figures)
    assert _counts(sp) == {"all_gather": 6, "reduce_scatter": 4}


def test_the_runs_last_layer_pays_its_entry_and_exit_and_any_other_prices_a_cut():
    graph = gpt_like_graph(layers=3, hidden=64, seq=16, heads=4, vocab=128)
    s = Strategy(1, 1, 2, 1, 2, "1f1b", "ddp", precision="fp32", sequence_parallel=True)
    block0, block2, ln_f = (layer_choice_cost(graph, graph.layer(name), A100, s, name != "ln_f", None)
                            for name in ("blocks.0", "blocks.2", "ln_f"))
    pair = [("all_gather", 4096), ("all_gather", 4096)]
    assert [(c.kind, c.nbytes) for c in block2.tp_collectives][-2:] == pair and block2.cut_s == 0
    assert len(block0.tp_collectives) == len(block2.tp_collectives) - 2
    # a pipeline cut after blocks.0 gathers the stream there and splits it again on the next stage
    assert [(c.kind, c.nbytes) for c in block0.cut_collectives] == pair and block0.cut_s > 0
    assert ln_f.tp_collectives == () and ln_f.cut_s == 0
    plain = layer_choice_cost(graph, graph.layer("ln_f"), A100, Strategy(1, 1, 2, 1, 2, "1f1b", "ddp"), False, None)
    assert plain.tp_collectives == ()


def _pipelined(stages: list[list[str]], sequence_parallel=True) -> tuple:
    """A pp2×tp2 plan of a 3-block synthetic GPT cut as ``stages``, with sequence parallelism."""
    from autoplan.plan import Mesh, ModelInfo

    graph = gpt_like_graph(layers=3, hidden=64, seq=16, heads=4, vocab=128)
    styles = {}
    for i in range(3):
        styles.update({f"blocks.{i}.attn.qkv": "colwise", f"blocks.{i}.attn.proj": "rowwise",
                       f"blocks.{i}.mlp.fc": "colwise", f"blocks.{i}.mlp.proj": "rowwise"})
        if sequence_parallel:
            styles.update({f"blocks.{i}.ln1": "sequence", f"blocks.{i}.ln2": "sequence"})
    plan = autoplan.Plan(
        model=ModelInfo(graph.model_name, graph.fingerprint, graph.num_params), cluster=A100_4,
        global_batch_size=4, microbatch_size=1, microbatches=4, mesh=Mesh(pp=2, tp=2),
        schedule="1f1b", data_parallel="ddp", stages=tuple(autoplan.Stage(tuple(s)) for s in stages),
        tensor_parallel=styles, precision="fp32", sequence_parallel=sequence_parallel)
    return graph, plan


def test_each_stage_pays_its_own_piece_of_a_run():
    from autoplan.cost.plan_cost import estimate_breakdown
    from autoplan.cost.traffic import plan_collectives

    def gathers(stages):
        graph, plan = _pipelined(stages)
        per_rank = plan_collectives(graph, plan)
        return [sum(c.count for c in rank if c.kind == "all_gather") for rank in per_rank], \
            [sum(c.count for c in rank if c.kind == "all_reduce") for rank in per_rank], graph, plan

    head = ["tok", "pos"]
    # cut inside the run: blocks.0 | blocks.1-2 (m = 4 microbatches; per block and microbatch 6 gathers, as pp = 1)
    inside, norms, graph, plan = gathers([head + ["blocks.0"], ["blocks.1", "blocks.2", "ln_f", "head"]])
    assert inside == [4 * (6 * 1 + 2), 4 * (6 * 2 + 2)]     # each stage: its blocks' gathers + one entry and exit
    assert norms == [4, 8]                         # each stage's norm weights and biases (2 norms per block)
    # cut right after the run: stage 0 gathers it, the stage after has nothing to gather
    after, _, _, _ = gathers([head + ["blocks.0", "blocks.1", "blocks.2"], ["ln_f", "head"]])
    assert after == [4 * (6 * 3 + 2), 0]
    # priced in the step: the cut's gathers on stage 0's rank, and the same communication as one stage holding both
    ranks = estimate_breakdown(graph, plan).ranks
    cut = layer_choice_cost(graph, graph.layer("blocks.0"), A100_4, Strategy.of(plan), True, None).cut_s
    block_s = [layer_choice_cost(graph, graph.layer(f"blocks.{i}"), A100_4, Strategy.of(plan), True, None).tp_comm_s
               for i in range(3)]
    assert ranks[0].tp_comm_s == pytest.approx(block_s[0] + cut, rel=1e-12)
    assert ranks[1].tp_comm_s == pytest.approx(block_s[1] + block_s[2], rel=1e-12)
    assert cut == pytest.approx(block_s[2] - block_s[1], rel=1e-9)   # one entry + exit, as the run's last pays


def test_layer_choices_force_sharding_and_whole_recompute():
    block = gpt_like_graph(layers=1, seq=16).layer("blocks.0")
    assert {c.tp_on for c in layer_choices(block, 2, "auto")} == {False, True}
    forced = layer_choices(block, 2, "auto", sequence_parallel=True)
    assert {c.tp_on for c in forced} == {True}
    assert [c.recompute for c in forced] == [None, 0]       # the child (attention core) option is left out


def test_options_are_validated():
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="sequence_parallel must be 'auto', True or False"):
            PlanOptions(sequence_parallel=bad)
    with pytest.raises(ValueError, match="pins tp=1"):
        PlanOptions(mesh={"tp": 1}, sequence_parallel=True)
    assert PlanOptions(mesh={"pp": 2}, sequence_parallel=True).sequence_parallel is True   # with pipelines too
    assert _parser().parse_args(["plan", "m:f", "--sequence-parallel", "on"]).sequence_parallel == "on"


def test_forced_on_a_model_without_pairs_is_refused():
    with pytest.raises(ValueError, match="no layer of MLP can run it"):
        search(mlp_graph(widths=(64, 64, 64)), A100, PlanOptions(global_batch_size=32, sequence_parallel=True))


def test_solver_plans_it_and_the_plan_round_trips():
    graph = gpt_like_graph(layers=2, hidden=256, seq=128, heads=4, vocab=512)
    plan = search(graph, A100, PlanOptions(global_batch_size=8, mesh={"tp": 2, "pp": 1}, sequence_parallel=True))
    assert plan.sequence_parallel and plan.mesh.tp == 2
    assert {f for f, s in plan.tensor_parallel.items() if s == "sequence"} == {
        f"blocks.{i}.{n}" for i in range(2) for n in ("ln1", "ln2")}
    data = plan.to_dict()
    assert data["sequence_parallel"] is True
    assert autoplan.Plan.from_dict(data) == plan
    off = search(graph, A100, PlanOptions(global_batch_size=8, mesh={"tp": 2, "pp": 1}, sequence_parallel=False))
    assert not off.sequence_parallel and "sequence_parallel" not in off.to_dict()   # the v1 form, unchanged
    auto = search(graph, A100, PlanOptions(global_batch_size=8, mesh={"tp": 2, "pp": 1}))
    assert auto.predicted.step_time_s <= min(plan.predicted.step_time_s, off.predicted.step_time_s) * (1 + 1e-9)


def test_solver_plans_it_with_a_pipeline():
    graph = gpt_like_graph(layers=4, hidden=256, seq=128, heads=4, vocab=512)
    options = dict(global_batch_size=8, microbatch_size=1, schedule="1f1b")
    plan = search(graph, A100_4, PlanOptions(mesh={"tp": 2, "pp": 2}, sequence_parallel=True, **options))
    assert plan.sequence_parallel and plan.mesh.pp == 2
    assert autoplan.Plan.from_dict(plan.to_dict()) == plan
    off = search(graph, A100_4, PlanOptions(mesh={"tp": 2, "pp": 2}, sequence_parallel=False, **options))
    auto = search(graph, A100_4, PlanOptions(mesh={"tp": 2, "pp": 2}, **options))
    assert auto.predicted.step_time_s <= min(plan.predicted.step_time_s, off.predicted.step_time_s) * (1 + 1e-9)


def test_plan_field_is_checked():
    plan = search(gpt_like_graph(layers=2, hidden=256, seq=128, heads=4, vocab=512), A100,
                  PlanOptions(global_batch_size=8, mesh={"tp": 2, "pp": 1}, sequence_parallel=True))
    with pytest.raises(ValueError, match="sequence_parallel is off"):
        plan.replace(sequence_parallel=False)
    styles = {f: s for f, s in plan.tensor_parallel.items() if s != "sequence"}
    with pytest.raises(ValueError, match="no module has the style 'sequence'"):
        plan.replace(tensor_parallel=styles)
    with pytest.raises(ValueError, match="needs colwise and rowwise"):
        plan.replace(tensor_parallel={**plan.tensor_parallel, "ln_f.inner": "sequence"})
    data = plan.to_dict()
    data["sequence_parallel"] = "true"
    with pytest.raises(ValueError, match="'sequence_parallel' must be true or false"):
        autoplan.Plan.from_dict(data)
    assert autoplan.Plan.from_dict(autoplan.Plan.example().to_dict()).sequence_parallel is False


class _GatedBlock(nn.Module):
    """A pre-norm block with a non-norm weight on the residual stream (a gate): not splittable by sequence."""

    def __init__(self, h=16):
        super().__init__()
        self.norm = nn.LayerNorm(h)
        self.gate = nn.Linear(h, h)
        self.up, self.down = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x)))) * torch.sigmoid(self.gate(x))


def test_trace_finds_the_norms_and_names_what_blocks_it():
    model = nn.Sequential(_GatedBlock(), nn.LayerNorm(16))
    graph = autoplan.trace(model, torch.randn(2, 8, 16))
    sp = graph.layer("0").sequence_parallel
    assert sp is not None and not sp.possible
    assert "0.gate (Linear) holds parameters outside the tensor-parallel pairs" in sp.blocker
    with pytest.raises(ValueError, match="0.gate"):
        search(graph, autoplan.Cluster.preset("cpu", devices_per_node=2),
               PlanOptions(precision="fp32", sequence_parallel=True))


def test_a_pipeline_stage_never_sends_a_sequence_shard():
    """Each stage gathers its runs where they end; a run's inner output read past the stage would leave as a
    DTensor (its local shard sent as if whole): the stage's hook refuses it before anything is sent."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from autoplan.execute.tensor_parallel import check_stage_outputs_whole

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))

        class Leaky(nn.Module):
            def forward(self, x):
                return x, DTensor.from_local(x, mesh, (Shard(1),), run_check=False)

        stage = Leaky()
        check_stage_outputs_whole(stage, 1)
        with pytest.raises(autoplan.PlanMismatchError, match="stage 1 would send a sequence-parallel DTensor"):
            stage(torch.ones(1, 4, 2))
    finally:
        dist.destroy_process_group()


def _gpt_under_sequence_parallel(layers: int, mesh):
    """autoplan's GPT (h = 64, s = 16, a = 4) with every block's pairs and norms sharded over ``mesh``."""
    from autoplan.execute.tensor_parallel import apply_tensor_parallel
    from autoplan.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=128, seq_len=16, hidden=64, layers=layers, heads=4))
    styles = {}
    for i in range(layers):
        styles.update({f"blocks.{i}.attn.qkv": "colwise", f"blocks.{i}.attn.proj": "rowwise",
                       f"blocks.{i}.mlp.fc": "colwise", f"blocks.{i}.mlp.proj": "rowwise",
                       f"blocks.{i}.ln1": "sequence", f"blocks.{i}.ln2": "sequence"})
    blocks = [f"blocks.{i}" for i in range(layers)]
    apply_tensor_parallel(model, styles, mesh, ["tok", "pos", *blocks, "ln_f", "head"])
    return model


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_a_block_keeps_its_pairs_inputs_as_shards_measured_as_priced():
    """What a sequence-parallel block keeps after forward, measured with torch's MemTracker on a fake 2-rank world
    (one block's bytes: two blocks' less one's), equals the cost model's: the norms' side and each pair's input at
    1/t, Megatron's storage (the shard saved, gathered again in backward), not DTensor's gathered input; and the
    collectives one step issues are those charged (one gather per pair's input, one again in backward)."""
    pytest.importorskip("torch.distributed._tools.mem_tracker", reason="needs torch's MemTracker")
    import torch.distributed as dist
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from autoplan.models import GPT, GPTConfig

    graph = autoplan.trace(GPT(GPTConfig(vocab_size=128, seq_len=16, hidden=64, layers=2, heads=4)),
                           torch.randint(0, 128, (1, 16)))
    block, sp_layer = graph.layer("blocks.0"), graph.layer("blocks.0").sequence_parallel
    figures = dict(traced_batch_size=1, traced_dtype_bytes=4, cluster=A100, tp=2, microbatch_size=1, precision="fp32")
    base = layer_cost(block, **figures)
    priced = sequence_parallel_cost(block, base, **figures)
    assert priced.activation_bytes == base.activation_bytes - (sp_layer.sharded_bytes + sp_layer.shared_input_bytes) / 2

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        tokens = torch.randint(0, 128, (1, 16))

        def kept_after_forward(layers: int) -> int:
            model = _gpt_under_sequence_parallel(layers, mesh)
            tracker = MemTracker()
            tracker.track_external(model)
            with tracker:
                before = sum(d.get("Total", 0) for d in tracker.get_tracker_snapshot("current").values())
                logits = model(tokens)
                after = sum(d.get("Total", 0) for d in tracker.get_tracker_snapshot("current").values())
            del logits
            return after - before

        assert kept_after_forward(2) - kept_after_forward(1) == priced.activation_bytes

        model = _gpt_under_sequence_parallel(1, mesh)
        with CommDebugMode() as issued:
            model(tokens).sum().backward()
        counts = {str(op).split(".")[-1]: n for op, n in issued.get_comm_counts().items()}
        charged = _counts(priced)
        # the block's, plus the run's exit (a gather in forward) and entry (a gather of the input's gradient)
        assert counts == {"all_gather_into_tensor": charged["all_gather"] + 2,
                          "reduce_scatter_tensor": charged["reduce_scatter"]}
    finally:
        dist.destroy_process_group()
