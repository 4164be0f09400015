"""One layer's cost under a layout's choices (:func:`layer_choice_cost`), and the choices a plan makes for each
layer (its stage, tensor-parallel flag and recompute option): what :mod:`autoplan.cost.plan_cost` composes into a
step and the solver's tables cost once per strategy.

Example (a GPT block at h = 64: tp = 2 halves its 12h² matmul weights, not its 13h norms and biases):
    >>> from autoplan import Cluster
    >>> from autoplan.synthetic import gpt_like_graph
    >>> graph = gpt_like_graph(layers=1, hidden=64, seq=16, heads=4, vocab=100)
    >>> s, block = Strategy(1, 1, 2, 1, 1, "1f1b", "ddp"), graph.layer("blocks.0")
    >>> layer_choice_cost(graph, block, Cluster.preset("a100-80gb"), s, True, None).num_params
    25408
"""

from __future__ import annotations

from dataclasses import replace

from .. import cost
from ..cluster import Cluster
from ..graph import Layer, LowPrecisionBytes, ModelGraph, RecomputeOption, TensorParallelGroup
from ..mixed_precision import low_precision_run
from ..plan import Plan
from ..vocabulary import PRECISION_BYTES
from .row_exchange import exchanged_elements
from .strategy import Strategy

__all__ = ["layer_choice_cost", "layer_cost_context", "as_low_precision_runs", "owns_tied_weight", "plan_layer_choices"]


def layer_choice_cost(graph: ModelGraph, layer: Layer, cluster: Cluster, strategy: Strategy, tp_on: bool,
                      recompute: RecomputeOption | None,
                      context: tuple[float, int, float] | None = None) -> cost.LayerCost:
    """:func:`autoplan.cost.layer_cost` of ``layer`` under ``strategy``, sharded by ``tp`` iff ``tp_on``.
    ``context``: :func:`layer_cost_context`'s answer, when the caller has it (or, for a lower bound, a relaxed
    one: no FSDP unit and no per-step seconds only remove non-negative terms).

    Example (a GPT block at h = 64: tp = 2 halves its 12h² matmul weights, not its 13h norms and biases):
        >>> from autoplan import Cluster
        >>> from autoplan.synthetic import gpt_like_graph
        >>> graph = gpt_like_graph(layers=1, hidden=64, seq=16, heads=4, vocab=100)
        >>> s, block = Strategy(1, 1, 2, 1, 1, "1f1b", "ddp"), graph.layer("blocks.0")
        >>> [layer_choice_cost(graph, block, Cluster.preset("a100-80gb"), s, tp_on, None).num_params
        ...  for tp_on in (False, True)]
        [49984, 25408]
    """
    contention, fsdp_unit, per_step_s = context or layer_cost_context(graph, layer, cluster, strategy, tp_on)
    run = low_precision_run(strategy.mixed_precision)
    if run is not None:
        layer = as_low_precision_runs(layer, graph.dtype_bytes, strategy.precision, run)
    result = cost.layer_cost(
        layer, traced_batch_size=graph.batch_size, traced_dtype_bytes=graph.dtype_bytes, cluster=cluster,
        tp=strategy.tp if tp_on else 1, microbatch_size=strategy.microbatch_size, precision=strategy.precision,
        recompute=recompute, tp_stride=1, contention=contention, fsdp_unit=fsdp_unit, per_step_s=per_step_s,
        fsdp_keeps_weights=strategy.fsdp_keeps_weights, exchanged_elements=exchanged_elements(graph, layer),
    )
    if strategy.sequence_parallel:
        result = _with_sequence_parallel(graph, layer, cluster, strategy, tp_on, recompute, result)
    return result


def as_low_precision_runs(layer: Layer, traced_dtype_bytes: int, precision: str, run: str) -> Layer:
    """``layer`` with its boundary, its saved activations and its tensor-parallel groups' tensors at the bytes
    ``run`` (``"autocast"`` or ``"bf16_weights"``, :func:`autoplan.mixed_precision.low_precision_run`)
    gives them (:mod:`autoplan.trace.low_precision_bytes`), written as traced bytes: :func:`autoplan.cost.
    layer_cost` scales traced bytes by the precision's element size, so a tensor kept in fp32 (autocast's residual
    stream, pipeline boundary, the input gradient a pair all-reduces, a norm's saved input; an RMSNorm's upcast
    under bf16 weights) is written back at twice its bytes for bf16. The parts of the saved bytes (a pair's, a
    recompute option's, sequence parallelism's) take the layer's ratio. A figure the trace did not record keeps the
    traced one (the precision's bytes are charged).

    Example (a GPT block under bf16 autocast: its output stays fp32, its projections' outputs are bf16):
        >>> from autoplan.graph import Layer, LowPrecisionBytes, TensorParallelGroup
        >>> pair = TensorParallelGroup({"b.fc": "colwise", "b.proj": "rowwise"}, 4, 10, 10, 10, output_bytes=4096,
        ...                            input_bytes=4096, autocast=LowPrecisionBytes(2048, 4096))
        >>> block = Layer("b", 0, "block", 10, 20, 10, 40, 100, output_bytes=4096, tp_groups=(pair,),
        ...               autocast=LowPrecisionBytes(output_bytes=4096))
        >>> runs = as_low_precision_runs(block, 4, "bf16", "autocast")
        >>> runs.output_bytes, runs.tp_groups[0].output_bytes, runs.tp_groups[0].input_bytes
        (8192, 4096, 8192)
        >>> as_low_precision_runs(block, 4, "bf16", "bf16_weights").output_bytes  # not traced: halved when priced
        4096
    """
    unscale = traced_dtype_bytes / PRECISION_BYTES[precision]
    seen = getattr(layer, run) or LowPrecisionBytes()

    def at(traced: int, low: int | None) -> int:
        return traced if low is None else round(low * unscale)

    def group(g: TensorParallelGroup) -> TensorParallelGroup:
        low = getattr(g, run) or LowPrecisionBytes()
        gradient = g.input_gradient_bytes  # the output's shape in the input's dtype (autocast's fp32 stream)
        if low.input_bytes is not None and g.input_bytes:
            gradient = round((g.input_gradient_bytes or g.output_bytes) * low.input_bytes / g.input_bytes * unscale)
        return replace(g, output_bytes=at(g.output_bytes, low.output_bytes), input_bytes=at(g.input_bytes,
                       low.input_bytes), input_gradient_bytes=gradient, activation_bytes=part(g.activation_bytes))

    # what the layer saves: its own figure, and the parts of it (a pair's share, a recompute option's) at its ratio
    saved = 1.0 if seen.activation_bytes is None or not layer.activation_bytes \
        else seen.activation_bytes / layer.activation_bytes * unscale

    def part(nbytes: int) -> int:
        return round(nbytes * saved)

    options = tuple(replace(o, saved_activation_bytes=part(o.saved_activation_bytes)) for o in layer.recompute_options)
    sp = layer.sequence_parallel
    if sp is not None:
        sp = replace(sp, sharded_bytes=part(sp.sharded_bytes), shared_input_bytes=part(sp.shared_input_bytes),
                     gathered_bytes=part(sp.gathered_bytes))
    return replace(layer, output_bytes=at(layer.output_bytes, seen.output_bytes),
                   tp_groups=tuple(group(g) for g in layer.tp_groups),
                   activation_bytes=at(layer.activation_bytes, seen.activation_bytes),
                   recompute_options=options, sequence_parallel=sp)


def layer_cost_context(graph: ModelGraph, layer: Layer, cluster: Cluster, strategy: Strategy, tp_on: bool,
                       largest_layer_params: int | None = None) -> tuple[float, int, float]:
    """What :func:`layer_choice_cost` reads from the whole strategy besides its tp degree, microbatch size,
    precision and sequence parallelism: ``(contention, fsdp_unit, per_step_s)`` — ranks sharing processors
    (pp, microbatches, schedule), the size of ``layer``'s FSDP group when it is an FSDP unit of its own (dp,
    data-parallel kind; 0 when it is not: the per-layer hooks cost per group size) and its fixed per-step
    seconds. A memo of layer costs across strategies must key on these too.
    ``largest_layer_params``: the graph's largest layer, when the caller has it (saves a scan per call).

    Example (FSDP over 4 ranks makes the block a unit of its own, of 4 ranks; DDP does not):
        >>> from autoplan import Cluster
        >>> from autoplan.synthetic import gpt_like_graph
        >>> graph = gpt_like_graph(layers=2, hidden=64, seq=16, heads=4, vocab=100)
        >>> block, c = graph.layer("blocks.0"), Cluster.preset("a100-80gb")
        >>> [layer_cost_context(graph, block, c, Strategy(1, 4, 1, 1, 1, "1f1b", kind), False)[1]
        ...  for kind in ("ddp", "fsdp")]
        [0, 4]
    """
    contention = strategy.contention(cluster)
    fsdp_unit = strategy.dp if _fsdp_unit(graph, layer, strategy, largest_layer_params) else 0
    per_step_s = cost.layer_step_overhead_s(  # its optimizer launches run with every rank stepping at once
        cluster, param_tensors=len(layer.param_names), dtensor=_dtensor_params(strategy, tp_on),
        fsdp_unit=fsdp_unit, dp=strategy.dp, stride=strategy.tp, precision=strategy.precision,
        microbatches=strategy.microbatches, pp=strategy.pp, contention=strategy.step_end_contention(cluster),
        reshard=strategy.fsdp_reshard)
    return contention, fsdp_unit, per_step_s


def _with_sequence_parallel(graph: ModelGraph, layer: Layer, cluster: Cluster, strategy: Strategy, tp_on: bool,
                            recompute: RecomputeOption | None, base: cost.LayerCost) -> cost.LayerCost:
    """``base`` under sequence parallelism (:mod:`autoplan.cost.sequence`): a sharded layer that allows it splits
    its stream and pays, spread over the step's microbatches, the per-step all-reduce of its norm weights'
    gradients. The last layer of a run pays the run's entry and exit; any other layer of a run prices a pipeline
    cut after it (``cut_s``): the stage before the cut gathers the stream and the stage after splits it again,
    the same two all-gathers, so each stage's piece of a run pays one entry and one exit."""
    from . import sequence

    if not (tp_on and sequence.sequence_parallel_applies(layer, strategy.tp)):
        return base
    figures = dict(traced_batch_size=graph.batch_size, traced_dtype_bytes=graph.dtype_bytes, cluster=cluster,
                   tp=strategy.tp, microbatch_size=strategy.microbatch_size, precision=strategy.precision)
    result = sequence.sequence_parallel_cost(layer, base, recompute=recompute, **figures)
    # the row exchanges of unequal fused parts (autoplan.cost.row_exchange) run as without the split stream
    rows = tuple(c for c in base.tp_collectives if c.kind == "all_to_all")
    if rows and result is not base:
        rows_s = sum(c.count * cost.group_alltoall_s(c.nbytes, cluster, c.group_size, 1, c.moved) for c in rows)
        result = replace(result, tp_collectives=result.tp_collectives + rows, tp_comm_s=result.tp_comm_s + rows_s)
    scale = strategy.microbatch_size / graph.batch_size * PRECISION_BYTES[strategy.precision] / graph.dtype_bytes
    edges = sequence.sequence_edge_collectives(layer.output_bytes * scale, strategy.tp)
    edges_s = sequence.collectives_s(edges, cluster)
    norms_s = sequence.collectives_s(sequence.norm_gradient_collectives([layer], strategy.tp), cluster)
    tp_comm_s = result.tp_comm_s + norms_s / strategy.microbatches
    following = graph.layers[layer.index + 1] if layer.index + 1 < len(graph.layers) else None
    if following is None or not sequence.sequence_parallel_applies(following, strategy.tp):
        return replace(result, tp_collectives=result.tp_collectives + edges, tp_comm_s=tp_comm_s + edges_s)
    return replace(result, tp_comm_s=tp_comm_s, cut_s=edges_s, cut_collectives=edges)


def _dtensor_params(strategy: Strategy, tp_on: bool) -> bool:
    """Whether the layer's parameters are DTensors: tensor-parallel, or data-parallel by FSDP2 / ``replicate``
    (DDP composed with tensor or pipeline parallelism, :mod:`autoplan.execute.data_parallel`)."""
    composed = strategy.tp > 1 or strategy.pp > 1
    return tp_on or (strategy.dp > 1 and (strategy.data_parallel == "fsdp" or composed))


def owns_tied_weight(graph: ModelGraph, layer: Layer) -> bool:
    """Whether ``layer`` holds a parameter tied to another (``graph.tied_parameters``): the executor leaves such a
    layer with its stage root instead of an FSDP unit of its own.

    Example:
        >>> from dataclasses import replace
        >>> from autoplan.synthetic import gpt_like_graph
        >>> g = gpt_like_graph(layers=1)
        >>> g.tied_parameters = [("tok.weight", "head.weight")]
        >>> tok, block = replace(g.layers[0], param_names=("tok.weight",)), g.layers[2]
        >>> owns_tied_weight(g, tok), owns_tied_weight(g, block)
        (True, False)
    """
    return any(name in group for group in graph.tied_parameters for name in layer.param_names)


def _fsdp_unit(graph: ModelGraph, layer: Layer, strategy: Strategy, largest_layer_params: int | None = None) -> bool:
    """Whether the executor wraps ``layer`` in an FSDP unit of its own: FSDP over dp > 1, the layer owns no tied
    weight (those stay with the stage root, ``autoplan.execute.data_parallel.shardable_layers``) and holds at
    least 1/8 of the largest layer's parameters (``autoplan.execute.data_parallel.UNIT_MIN_FRACTION``)."""
    if strategy.data_parallel != "fsdp" or strategy.dp == 1 or layer.num_params == 0:
        return False
    if owns_tied_weight(graph, layer):
        return False  # a GPT's tied token embedding: its hooks are the root's (cost.data_parallel_root_s)
    if largest_layer_params is None:
        largest_layer_params = max(l.num_params for l in graph.layers)
    return layer.num_params * 8 >= largest_layer_params


def plan_layer_choices(graph: ModelGraph, plan: Plan) -> list[list[tuple[Layer, bool, RecomputeOption | None]]]:
    """Each stage's layers with their tensor-parallel flag and recompute option, as the plan states them."""
    by_name = {layer.name: layer for layer in graph.layers}
    unknown = [name for name in plan.layers if name not in by_name]
    if unknown:
        raise ValueError(f"plan names layers {unknown[:5]} that the model graph does not have; "
                         f"re-plan for this model")
    missing = [layer.name for layer in graph.layers if layer.name not in set(plan.layers)]
    if missing:
        raise ValueError(f"plan leaves out layers {missing[:5]}; every layer must be in exactly one stage")
    order = [by_name[name].index for name in plan.layers]
    if order != sorted(order):
        raise ValueError("plan stages must list layers in model order (pipeline stages are contiguous)")
    stages = []
    for stage in plan.stages:
        wanted = set(stage.recompute)
        offered = {o.module for name in stage.layers for o in by_name[name].recompute_options}
        unpriced = sorted(wanted - offered)
        if unpriced:
            # pricing such a module as "no recompute" would be a wrong number with no error
            raise ValueError(
                f"plan recomputes {unpriced[:5]}, which no layer of its stage offers as a recompute option (offered: "
                f"{sorted(offered)[:8]}); recompute a whole layer or one of the children its trace lists, or re-plan"
            )
        rows = []
        for name in stage.layers:
            layer = by_name[name]
            tp_on = plan.mesh.tp > 1 and any(fqn in plan.tensor_parallel for g in layer.tp_groups for fqn in g.styles)
            _check_sequence_marks(plan, layer, tp_on)
            option = next((o for o in layer.recompute_options if o.module in wanted), None)
            rows.append((layer, tp_on, option))
        stages.append(rows)
    return stages


def _check_sequence_marks(plan: Plan, layer: Layer, tp_on: bool) -> None:
    """The executor runs a layer sequence-parallel on the norms the plan marks "sequence"; the cost model prices
    sequence parallelism on a layer whose trace allows it at the plan's tp, with all of its norms. A hand-edited
    plan where the two differ would be priced for what does not run: refused."""
    from .sequence import sequence_parallel_applies

    prefix = layer.name + "."
    marked = {f[len(prefix):] for f, style in plan.tensor_parallel.items()
              if style == "sequence" and f.startswith(prefix)}
    priced = plan.sequence_parallel and tp_on and sequence_parallel_applies(layer, plan.mesh.tp)
    expected = set(layer.sequence_parallel.norms) if priced else set()
    if marked != expected:
        raise ValueError(
            f"plan marks {sorted(marked)} of layer {layer.name!r} as 'sequence', but sequence parallelism is priced "
            f"on that layer {'with its norms ' + str(sorted(expected)) if expected else 'not at all'} (its trace at "
            f"tp={plan.mesh.tp}, with its tensor-parallel pairs {'on' if tp_on else 'off'}); mark exactly those "
            f"norms, or re-plan with autoplan.plan(..., sequence_parallel=...)")
