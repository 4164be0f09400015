"""The collectives the executor issues in one training step equal, in count and bytes, what the cost model
charges (autoplan.cost.traffic.plan_collectives), layout by layout, on 4 gloo ranks.

Counted with tests/comm_counter.py (torch.profiler over c10d). Every collective of the step is compared, the
loss's 4-byte broadcast over the pipeline and all-reduce over the replicas included. When the embedding and the
head sit on different pipeline ranks, the all-reduce that keeps them tied is charged, and so is the copy of the
weight the head's rank holds, which FSDP gathers and scatters there with the rest of its root (autoplan.cost.tied).
Under bf16 autocast (no data parallelism) the residual stream, the pipeline's sends and a pair's input gradient
stay fp32 while a pair's output is bf16 (autoplan.trace.autocast_bytes). The ``gqa`` cases (tests/models_gqa.py:
a fused qkv of unequal parts, ``colwise:32+16+16``) count the all-to-alls that hand each rank its rows of every
part (autoplan.cost.row_exchange): fp32 under DDP with recompute, bf16 under FSDP's mixed precision and under
autocast (pp2×tp2).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

import autoplan
from autoplan.cost import layer_cost
from autoplan.cost.row_exchange import exchanged_elements
from distributed_helpers import GLOBAL_BATCH, STEPS, layout, reference, run_world, train_one_process
from models_gqa import LAYERS as GQA_LAYERS
from models_gqa import build_gqa, gqa_batches, gqa_styles

WORKER = Path(__file__).with_name("collective_worker.py")


def _case(name: str, microbatches: int, fsdp_reshard: str = "step", **kw) -> dict:
    case = layout("gpt", name, **kw)
    case["plan"]["microbatches"] = microbatches
    case["name"] = f"{case['name']}:mb{microbatches}"
    if fsdp_reshard != "step":
        case["plan"]["fsdp_reshard"] = fsdp_reshard
        case["name"] += f":reshard-{fsdp_reshard}"
        case["numerics"] = True  # a new executor path: trains like one process too
    return case


def _gqa_case(name: str, *, pp=1, dp=1, data_parallel="ddp", recompute=False, precision="fp32",
              numerics=False) -> dict:
    stages = [GQA_LAYERS[:2], GQA_LAYERS[2:]] if pp > 1 else [GQA_LAYERS]
    kind = "gqa-nobias" if data_parallel == "fsdp" else "gqa"  # FSDP refuses a fused bias split over tp
    return {"name": f"{kind}:{name}", "kind": kind, "numerics": numerics,
            "plan": dict(stages=stages, pp=pp, dp=dp, tp=2, global_batch_size=GLOBAL_BATCH, microbatches=2,
                         data_parallel=data_parallel, tensor_parallel=gqa_styles(), precision=precision,
                         recompute=["blocks.0", "blocks.1"] if recompute else [])}


def _post_norm_case(name: str, **kw) -> dict:
    """A case of the post-norm GPT: its checkpoints re-run every block's last all-reduce (or reduce-scatter)."""
    case = layout("gpt", name, recompute=True, **kw)
    return {**case, "kind": "gpt-postnorm", "name": case["name"].replace("gpt:", "gpt-postnorm:"), "numerics": True}


CASES = [
    _case("ddp4", 2, dp=4),
    _case("fsdp4", 1, dp=4, data_parallel="fsdp"),
    _case("fsdp4", 4, dp=4, data_parallel="fsdp"),
    _case("fsdp4", 4, dp=4, data_parallel="fsdp", fsdp_reshard="microbatch"),  # ZeRO-3 per microbatch: 2m AG, m RS
    _case("tp4", 2, tp=4),
    _case("tp2xdp2", 2, tp=2, dp=2, recompute=True),
    _case("fsdp2xtp2", 2, tp=2, dp=2, data_parallel="fsdp"),
    _case("pp4-1f1b", 4, pp=4),
    _case("pp2xtp2-interleaved", 4, pp=2, tp=2, schedule="interleaved"),
    _case("fsdp2xpp2-gpipe", 4, pp=2, dp=2, data_parallel="fsdp", schedule="gpipe"),
    _case("ddp2xpp2-gpipe", 4, pp=2, dp=2, schedule="gpipe"),  # replicate all-reduces the head's tied copy too
    _case("tp4-sp", 2, tp=4, sequence_parallel=True),
    _case("tp2xdp2-sp", 2, tp=2, dp=2, recompute=True, sequence_parallel=True),
    _case("pp2xtp2-1f1b-sp", 4, pp=2, tp=2, sequence_parallel=True),  # a run cut by the stages: each splits and gathers
    # bf16 by autocast (no data parallelism): the stream and the boundaries it crosses stay fp32, a pair's output
    # is bf16 and its input gradient fp32
    _case("pp4-1f1b", 4, pp=4, precision="bf16"),
    _case("pp2xtp2-1f1b", 4, pp=2, tp=2, precision="bf16"),
    _post_norm_case("tp2xdp2", tp=2, dp=2),  # the last all-reduce of each block again in its recompute
    _post_norm_case("tp4-sp", tp=4, sequence_parallel=True),  # the last reduce-scatter again
    _gqa_case("dp2xtp2:recompute", dp=2, recompute=True, numerics=True),  # the exchange again in each recompute
    _gqa_case("fsdp2xtp2:bf16", dp=2, data_parallel="fsdp", precision="bf16"),  # the gathered bf16 weight moves
    _gqa_case("pp2xtp2:bf16", pp=2, precision="bf16"),  # autocast: the fp32 share is cast before it moves
]


def _compare(rank: dict) -> list[str]:
    """Mismatches between what ``rank`` issued and what it was charged, per kind."""
    issued: Counter = Counter()
    issued_bytes: Counter = Counter()
    for kind, nbytes in rank["issued"]:
        issued[kind] += 1
        issued_bytes[kind] += nbytes
    charged: Counter = Counter()
    charged_bytes: Counter = Counter()
    for kind, nbytes, count, axis in rank["charged"]:
        # FSDP's records count per unit (the root and every sizeable layer) and sum the bytes over units.
        units = rank["units"] if axis == "dp" and kind in ("all_gather", "reduce_scatter") else 1
        charged[kind] += count * units
        charged_bytes[kind] += nbytes * count
    problems = []
    for kind in sorted(set(issued) | set(charged)):
        if issued[kind] != charged[kind] or abs(issued_bytes[kind] - charged_bytes[kind]) > 1e-6 * max(
                1, charged_bytes[kind]):
            problems.append(f"{kind}: issued {issued[kind]} × {issued_bytes[kind]} B, charged {charged[kind]} × "
                            f"{charged_bytes[kind]:.0f} B")
    return problems


@pytest.mark.slow
def test_issued_collectives_equal_charged(tmp_path):
    results = run_world(CASES, tmp_path, nproc=4, worker=WORKER, timeout_s=400)
    failures = []
    for case in CASES:
        for rank in results[case["name"]]:
            problems = _compare(rank)
            if problems:
                failures.append(f"{case['name']} rank {rank['rank']} {rank['coords']}: " + "; ".join(problems))
    assert not failures, "\n".join(failures)
    refs = {"gpt": reference("gpt"), "gpt-postnorm": reference("gpt-postnorm")}
    refs["gqa"] = dict(zip(("losses", "state"), train_one_process(build_gqa(), gqa_batches(GLOBAL_BATCH, STEPS))))
    for case in (c for c in CASES if c.get("numerics")):
        got, ref = results[case["name"]][0], refs[case["kind"]]
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5), case["name"]
        for key, value in ref["state"].items():
            assert torch.allclose(got["state"][key], value, atol=1e-4, rtol=1e-4), (case["name"], key)


def test_row_exchange_charged_per_exchanged_tensor():
    """A ``colwise:a+b+c`` projection is charged one all-to-all of its rank's share per tensor (weight, bias) each
    way, at the compute precision, and again under a recompute that runs it; its elements come from the op graph;
    a sharded layer priced without them is refused."""
    model = build_gqa()
    graph = autoplan.trace(model, (gqa_batches(4, 1)[0][0],))
    assert {fqn: style for layer in graph.layers for g in layer.tp_groups for fqn, style in g.styles.items()} \
        == gqa_styles()
    block0, block1 = graph.layer("blocks.0"), graph.layer("blocks.1")
    assert exchanged_elements(graph, block0) == {"blocks.0.attn.qkv": (64 * 32, 64)}  # weight, bias
    assert exchanged_elements(graph, block1) == {"blocks.1.attn.qkv": (64 * 32,)}  # no bias
    figures = dict(traced_batch_size=graph.batch_size, traced_dtype_bytes=graph.dtype_bytes,
                   cluster=autoplan.Cluster.preset("a100-80gb"), tp=2, microbatch_size=4, precision="bf16")

    def exchanges(**kw):
        got = layer_cost(block0, exchanged_elements=exchanged_elements(graph, block0), **figures, **kw)
        return sorted(c.nbytes for c in got.tp_collectives if c.kind == "all_to_all"), got.tp_comm_s

    plain, plain_s = exchanges()
    got = layer_cost(block0, exchanged_elements=exchanged_elements(graph, block0), **figures)
    assert {c.moved for c in got.tp_collectives if c.kind == "all_to_all"} == {0.5}  # rank 0 keeps q rows 0-15
    assert plain == [64.0, 64.0, 2048.0, 2048.0]  # bf16 shares of 64 × 32 and 64 elements, forward and backward
    again, again_s = exchanges(recompute=block0.recompute_options[0])
    assert again == [64.0] * 3 + [2048.0] * 3 and again_s > plain_s
    with pytest.raises(ValueError, match="exchanged_elements"):
        layer_cost(block0, **figures)


def test_row_exchange_kept_under_sequence_parallelism():
    """Sequence parallelism re-prices a layer's pair collectives; the row exchanges stay, forward and backward."""
    from dataclasses import replace

    from autoplan.cost.plan_cost import Strategy, layer_choice_cost
    from autoplan.graph import SequenceParallelLayer

    graph = autoplan.trace(build_gqa(), (gqa_batches(4, 1)[0][0],))
    block = replace(graph.layer("blocks.0"), sequence_parallel=SequenceParallelLayer(norms=("ln",), sequence=8))
    graph.layers[block.index] = block
    cluster = autoplan.Cluster.preset("a100-80gb")
    costs = {sp: layer_choice_cost(graph, block, cluster, Strategy(1, 1, 2, 4, 1, "1f1b", "ddp", sequence_parallel=sp),
                                   True, None) for sp in (False, True)}
    kinds = {sp: sorted(c.kind for c in cost.tp_collectives) for sp, cost in costs.items()}
    assert kinds[False].count("all_to_all") == kinds[True].count("all_to_all") == 4  # weight and bias, each way
    assert "all_gather" in kinds[True]  # the split stream's gathers: the sequence-parallel price was taken


@pytest.mark.parametrize("sizes", [(32, 16, 16), (5120, 1280, 1280), (4096, 1024, 1024), (12, 4, 4, 4), (8, 8, 16)])
def test_moved_fraction_is_what_the_executor_sends(sizes):
    """The fraction priced for the busiest rank is what FusedRowsColwise's exchange plan sends off the rank."""
    from autoplan.cost.row_exchange import moved_fraction
    from autoplan.execute.tp_styles import _exchange_plan

    for t in (t for t in (2, 4, 5, 8, 10) if not any(size % t for size in sizes)):
        share = sum(sizes) // t
        sent = [share - _exchange_plan(sizes, r, t)[1][r] for r in range(t)]
        received = [share - _exchange_plan(sizes, r, t)[2][r] for r in range(t)]
        assert moved_fraction(sizes, t) == max(sent + received) / share, (sizes, t)
