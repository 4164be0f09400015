"""Sequence parallelism on a layer with a fused projection (``colwise:a+b+c``: Phi-3's qkv with grouped key/value
heads; ``colwise:K``): the trace never offers it there, so the cost model has no split-stream price for such a
layer, while the executor would split and gather its stream all the same. An edited plan asking for it is refused
before it is priced or run, naming the layer, the style and the way out."""

from __future__ import annotations

import pytest

import autoplan
from autoplan.cost.plan_cost import estimate
from autoplan.options import PlanOptions
from autoplan.solve import search
from models_gqa import build_gqa, gqa_batches


@pytest.fixture(scope="module")
def gqa():
    """The grouped-head model traced, and its plan on two CPU ranks at tp = 2 (qkv sharded as colwise:32+16+16)."""
    graph = autoplan.trace(build_gqa(), (gqa_batches(4, 1)[0][0],))
    plan = search(graph, autoplan.Cluster.preset("cpu", devices_per_node=2),
                  PlanOptions(global_batch_size=4, precision="fp32", mesh={"tp": 2}))
    return graph, plan


def test_the_trace_offers_no_sequence_parallelism_on_a_layer_of_unequal_fused_parts(gqa):
    graph, plan = gqa
    assert plan.tensor_parallel["blocks.0.attn.qkv"] == "colwise:32+16+16"
    assert graph.layer("blocks.0").sequence_parallel is None  # so nothing prices a split stream there
    with pytest.raises(ValueError, match="no layer of GroupedModel can run it"):
        search(graph, autoplan.Cluster.preset("cpu", devices_per_node=2),
               PlanOptions(global_batch_size=4, precision="fp32", mesh={"tp": 2}, sequence_parallel=True))


def test_an_edited_plan_with_sequence_parallelism_there_is_refused(gqa):
    graph, plan = gqa
    edited = {**plan.tensor_parallel, "blocks.0.ln": "sequence"}
    # before the refusal this plan was priced exactly as without sequence parallelism, which it does not run
    with pytest.raises(ValueError, match=r"sequence-parallel layer 'blocks\.0' holds 'blocks\.0\.attn\.qkv' with the "
                                         r"style 'colwise:32\+16\+16'.*set sequence_parallel false, or drop the "
                                         r"'sequence' styles of 'blocks\.0' \(\['blocks\.0\.ln'\]\)"):
        plan.replace(sequence_parallel=True, tensor_parallel=edited)
    data = plan.to_dict()
    data.update(sequence_parallel=True, tensor_parallel=edited)
    with pytest.raises(ValueError, match="priced without it"):
        autoplan.Plan.from_dict(data)
    assert estimate(graph, plan).step_time_s == plan.predicted.step_time_s  # the plan as planned still prices


@pytest.mark.parametrize("style", ["colwise:2", "colwise:2/dtensor", "colwise/dtensor"])
def test_every_other_colwise_form_is_refused_alike(gqa, style):
    _, plan = gqa
    styles = {**plan.tensor_parallel, "blocks.0.attn.qkv": style, "blocks.0.ln": "sequence"}
    with pytest.raises(ValueError, match=f"with the style '{style}', not a plain colwise or rowwise linear"):
        plan.replace(sequence_parallel=True, tensor_parallel=styles)


def test_a_plan_whose_sequence_marks_differ_from_what_is_priced_is_refused():
    """The executor splits the stream of the layers whose norms the plan marks; the cost model prices the layers
    the trace allows, with all of their norms. An edited plan where they differ is refused by estimate()."""
    from dataclasses import replace

    from autoplan.synthetic import gpt_like_graph

    graph = gpt_like_graph(layers=2, hidden=64, seq=16, heads=4, vocab=100)
    plan = search(graph, autoplan.Cluster.preset("cpu", devices_per_node=2),
                  PlanOptions(global_batch_size=4, precision="fp32", mesh={"tp": 2}, sequence_parallel=True))
    marks = {f for f, s in plan.tensor_parallel.items() if s == "sequence" and f.startswith("blocks.1.")}
    assert marks and estimate(graph, plan).step_time_s > 0
    dropped = next(iter(sorted(marks)))
    edited = replace(plan, tensor_parallel={f: s for f, s in plan.tensor_parallel.items() if f != dropped})
    with pytest.raises(ValueError, match=r"plan marks .* of layer 'blocks\.1' as 'sequence', but sequence "
                                         r"parallelism is priced on that layer with its norms"):
        estimate(graph, edited)


def test_a_layer_with_a_fused_and_a_plain_pair_says_why_it_cannot_run_sequence_parallel():
    """nanoGPT's block: a fused qkv (colwise:3) beside a plain MLP pair. The reason names the fused module, not a
    vocabulary-parallel one it does not hold."""
    import nanogpt

    graph = autoplan.trace(nanogpt.build(), (nanogpt.batches(1)[0][0],))
    blocker = graph.layer("transformer.h.0").sequence_parallel.blocker
    assert "transformer.h.0.attn.c_attn (colwise:3" in blocker and "vocabulary" not in blocker
