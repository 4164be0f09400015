"""``autoplan.trace``: an unmodified ``nn.Module`` and example inputs → :class:`~autoplan.graph.ModelGraph`.

Three passes, none of which runs the model's real compute or changes the model:

1. the op graph (:mod:`autoplan.trace.opgraph`): ``torch.fx.symbolic_trace``, else ``torch.export`` (non-strict);
2. one forward and backward on fake tensors (:mod:`autoplan.trace.measure`): FLOPs per op by
   ``torch.utils.flop_counter``, saved-for-backward storages, module call windows;
3. the layer chain and its figures (:mod:`autoplan.trace.chain`), tensor-parallel groups (:mod:`autoplan.trace.tp_groups`).

Example:
    >>> import torch, autoplan
    >>> from autoplan.models import GPT, GPTConfig
    >>> graph = autoplan.trace(GPT(GPTConfig()), torch.randint(0, 256, (2, 16)))
    >>> [layer.name for layer in graph.layers]
    ['tok', 'pos', 'blocks.0', 'blocks.1', 'ln_f', 'head']
    >>> graph.num_params, graph.tied_parameters
    (34176, [('tok.weight', 'head.weight')])
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .experts import experts_by_layer
from .fingerprint import model_fingerprint
from ..graph import Layer, ModelGraph, RecomputeOption, TensorParallelGroup
from ..names import in_module, tied_parameter_names
from .chain import (
    LayerLocator,
    choose_layer_names,
    layer_kind,
    layer_output_bytes,
    module_params,
    param_dtype_bytes,
)
from .tp_groups import DetectedGroup, detect_tp_groups
from .tp_check import check_tp_groups, record_parents
from .opgraph import build_op_graph, measure_error
from .low_precision_bytes import with_low_precision_bytes
from .measure import Measurement, measure, per_module
from .adapters import fake_run_kwargs, trace_kwargs
from .stages import pipeline_split_blocker
from .sequence import input_owners, sequence_parallel_layer
from .repeat import trace_repeated

__all__ = ["trace", "normalize_inputs"]

#: a module inside a layer (at any depth) is offered for selective recompute when it saves at least this share of
#: the layer's bytes
SELECTIVE_MIN_SHARE = 0.25


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict, int]:
    """``(args, kwargs, batch_size)`` from a tensor, a tuple/list of positional inputs or a dict of keywords.

    Example:
        >>> import torch
        >>> args, kwargs, batch = normalize_inputs({"x": torch.zeros(3, 2)})
        >>> (args, list(kwargs), batch)
        ((), ['x'], 3)
    """
    if example_inputs is None:
        raise ValueError(
            "example inputs are needed to trace a model: pass one batch as a tensor, a tuple of positional "
            "inputs or a dict of keyword inputs, e.g. autoplan.trace(model, torch.randint(0, vocab, (8, 1024))); "
            "tensors on the meta device work and allocate nothing"
        )
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    else:
        raise ValueError(
            f"example inputs must be a tensor, a tuple/list or a dict of keyword inputs, not "
            f"{type(example_inputs).__name__}"
        )
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not tensors:
        raise ValueError("example inputs hold no tensor: pass at least one input tensor whose dim 0 is the batch")
    batches = {tuple(t.shape[:1]) for t in tensors}
    if () in batches:
        raise ValueError("every example input needs a batch dim (dim 0); a 0-dim tensor was passed")
    if len(batches) > 1:
        raise ValueError(f"dim 0 of every example input is the batch, but they differ: {sorted(b[0] for b in batches)}")
    return args, kwargs, int(tensors[0].shape[0])


def trace(model: torch.nn.Module, example_inputs: Any = None) -> ModelGraph:
    """Trace ``model`` on ``example_inputs`` into a :class:`ModelGraph` without running its real compute.

    ``example_inputs``: a tensor, a tuple/list of positional inputs or a dict of keyword inputs; dim 0 of every
    input is the batch. The model may live on the meta device (a 175B model traces without its weights).
    Raises ``ValueError`` for missing or malformed inputs and :class:`autoplan.TraceError` when neither
    ``torch.fx`` nor ``torch.export`` can follow the model.

    Example:
        >>> import torch, autoplan
        >>> g = autoplan.trace(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()), torch.randn(4, 8))
        >>> g.method, g.batch_size, g.forward_flops
        ('fx', 4, 1024)
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"trace expects a torch.nn.Module, got {type(model).__name__}")
    args, given, batch_size = normalize_inputs(example_inputs)
    kwargs = trace_kwargs(model, given)  # e.g. use_cache=False: a generation cache is no training output
    fake = fake_run_kwargs(model, given)  # the fake forwards keep it: transformers then decides as on real tensors
    started = time.perf_counter()
    # a stack of identical blocks is traced at reduced depth and replicated (autoplan.trace.repeat), else in full
    graph = trace_repeated(model, lambda copy: _trace_all(copy, args, kwargs, batch_size, started, fake),
                           lambda expanded, whole: _whole_model(expanded, whole, args, kwargs, started))
    graph = graph if graph is not None else _trace_all(model, args, kwargs, batch_size, started, fake)
    graph.experts = experts_by_layer(model, graph)  # routed experts: what expert parallelism would shard
    return graph


def _trace_all(model: torch.nn.Module, args: tuple, kwargs: dict, batch_size: int, started: float,
               fake_kwargs: dict) -> ModelGraph:
    """Every module of ``model`` traced: the op graph (on ``kwargs``), one fake forward and backward and the
    low-precision passes (on ``fake_kwargs``: :func:`autoplan.trace.adapters.fake_run_kwargs`), the layer chain."""
    export_args, export_kwargs = _on_model_device(model, args, kwargs)
    op_graph = build_op_graph(model, export_args, export_kwargs)
    refused: list = []  # pairs whose parent hands out another head-shaped tensor: never offered, reported
    candidates = detect_tp_groups(op_graph, model, refused)
    try:
        m = measure(model, args, fake_kwargs, record_inputs=record_parents(model, candidates)
                    | input_owners([c.styles for c in candidates]))
    except Exception as error:  # noqa: BLE001 - reworded with the module and line, chained
        raise measure_error(model, error) from error

    call_order = {name: call.order for name, call in m.calls.items()}
    names = choose_layer_names(model, call_order)
    locator = LayerLocator(names, m.calls)
    n = len(names)

    fwd, bwd = locator.totals(m.forward_ops, "flops"), locator.totals(m.backward_ops, "flops")
    act = locator.totals(m.saved, "nbytes")
    boundary = layer_output_bytes(op_graph, locator)

    first_names = dict(model.named_parameters())  # each tensor once, under its first name
    layer_param_names: list[list[str]] = [[] for _ in range(n)]
    for pname in first_names:
        owner = locator.of_module(pname.rpartition(".")[0])
        # a parameter outside every layer (a root-level token such as ViT's cls) is used by the first layer
        layer_param_names[owner if owner is not None else 0].append(pname)

    sound, dropped = check_tp_groups(model, candidates, args, kwargs, recorded=m.inputs)
    groups_by_layer = _tp_groups_by_layer(sound, model, m, op_graph, locator)
    module_fwd, module_act = per_module(m)

    layers = []
    returned: dict = {}  # one fake forward per block structure and inputs (sequence parallelism's check)
    for i, name in enumerate(names):
        num_params = sum(first_names[p].numel() for p in layer_param_names[i])
        param_bytes = sum(first_names[p].numel() * first_names[p].element_size() for p in layer_param_names[i])
        layers.append(
            Layer(
                name=name,
                index=i,
                # saved bytes stay out of the kind: a storage shared by all blocks (Llama's rotary cos/sin) is
                # counted once, at the first block, yet the blocks are the same layer
                kind=layer_kind(model, name, (fwd[i], bwd[i], num_params)),
                forward_flops=fwd[i],
                backward_flops=bwd[i],
                num_params=num_params,
                param_bytes=param_bytes,
                activation_bytes=act[i],
                output_bytes=boundary[i],
                param_names=tuple(layer_param_names[i]),
                tp_groups=tuple(groups_by_layer.get(i, ())),
                recompute_options=_recompute_options(model, name, act[i], fwd[i], m, module_fwd, module_act,
                                                      groups_by_layer.get(i, ())),
                sequence_parallel=sequence_parallel_layer(model, name, groups_by_layer.get(i, []), m, act[i],
                                                          boundary[i], returned),
            )
        )

    layers = with_low_precision_bytes(layers, m, model, args, fake_kwargs)
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    return ModelGraph(
        model_name=type(model).__name__,
        layers=layers,
        nx_graph=op_graph.nx,
        batch_size=batch_size,
        dtype_bytes=param_dtype_bytes(model),
        num_params=sum(p.numel() for p in first_names.values()),
        forward_flops=sum(fwd),
        backward_flops=sum(bwd),
        input_bytes=sum(t.numel() * t.element_size() for t in tensors),
        fingerprint=model_fingerprint(model),
        tied_parameters=_tied_groups(model),
        tied_numels=_tied_numels(model),
        method=op_graph.method,
        trace_s=time.perf_counter() - started,
        tp_dropped=[(d.styles, d.reason) for d in dropped] + refused,
        pipeline_blocker=pipeline_split_blocker(model, names, (args, kwargs)) if len(names) > 1 else None,
    )


def _whole_model(graph: ModelGraph, model: torch.nn.Module, args: tuple, kwargs: dict, started: float) -> ModelGraph:
    """The fields of a graph traced on a reduced copy that depend on the whole model, recomputed on it."""
    return replace(
        graph, num_params=sum(p.numel() for p in model.parameters()), dtype_bytes=param_dtype_bytes(model),
        forward_flops=sum(layer.forward_flops for layer in graph.layers),
        backward_flops=sum(layer.backward_flops for layer in graph.layers), fingerprint=model_fingerprint(model),
        tied_parameters=_tied_groups(model), tied_numels=_tied_numels(model), trace_s=time.perf_counter() - started,
        # the copy's blocks are the model's (checked): its cuts are the model's; applying a plan checks again
        pipeline_blocker=graph.pipeline_blocker,
    )


def _on_model_device(model, args, kwargs):
    """Inputs moved to the meta device when the model lives there (export needs one device)."""
    first = next(iter(model.parameters()), None)
    if first is None or first.device.type != "meta":
        return args, kwargs

    def to_meta(x):
        return x.to("meta") if isinstance(x, torch.Tensor) else x

    return pytree.tree_map(to_meta, args), pytree.tree_map(to_meta, kwargs)


def _tied_groups(model: torch.nn.Module) -> list[tuple[str, ...]]:
    return [tuple(names) for names in tied_parameter_names(model)]


def _tied_numels(model: torch.nn.Module) -> list[int]:
    return [model.get_parameter(names[0]).numel() for names in tied_parameter_names(model)]


def _recompute_options(model, name, layer_act, layer_fwd, m, module_fwd, module_act,
                       groups=()) -> tuple[RecomputeOption, ...]:
    """The layer itself (full recompute) first, then each module inside it at any depth (pre-order) that saves at
    least ``SELECTIVE_MIN_SHARE`` of the layer's bytes: Megatron-style blocks keep the attention core (QKᵀ, softmax,
    dropout, ·V) a level below the attention module, ``blocks.i.attn.core``.

    A module's option is measured as the layer's: its saved bytes (its own and its descendants') less its input,
    which stays alive, and its forward FLOPs. An option is left out when another one frees at least its bytes for
    no more FLOPs and re-runs the output collectives of no more tensor-parallel pairs (``groups`` whose output its
    recomputation reaches, :attr:`RecomputeOption.unreached`): a wrapper around a single child, T5's
    ``SelfAttention`` beside the ``layer.0`` holding it and its norm. The cost model prices an option by those
    figures (memory freed; time: its FLOPs, one memory-bound pass over the bytes it frees, the pairs' collectives),
    so the option left out could win only by the pass over the bytes it does not free, which are exactly what
    recompute is asked for; options that trade bytes for FLOPs are all kept (``attn`` frees more than
    ``attn.core`` for its two linears; GPT-2's ``mlp.act`` frees less than ``mlp`` for no matmul). With the share
    rule this keeps the list short (a GPT block: the block, ``attn``, ``mlp``; a T5 block at most 4; a linear
    saves only its input, so it has none).
    """
    if layer_act <= 0:
        return ()
    call = m.calls.get(name)
    kept = call.input_bytes if call is not None else 0
    options = [RecomputeOption(name, layer_act - kept, layer_fwd, _unreached(m, name))] if layer_act > kept else []
    module = model.get_submodule(name) if name else model
    for relative, _ in module.named_modules():
        fqn = f"{name}.{relative}" if name else relative
        module_bytes = module_act.get(fqn, 0)
        if not relative or fqn not in m.calls or module_bytes < SELECTIVE_MIN_SHARE * layer_act:
            continue
        saved = max(0, module_bytes - m.calls[fqn].input_bytes)
        if saved > 0:
            options.append(RecomputeOption(fqn, saved, module_fwd.get(fqn, 0), _unreached(m, fqn)))

    def pairs(option: RecomputeOption) -> frozenset[int]:  # the groups whose output collectives it re-runs
        return frozenset(i for i, g in enumerate(groups)
                         if all(in_module(s, option.module) for s in g.styles) and option.reaches(g.styles))

    def beats(k: int, j: int) -> bool:  # options[k] makes options[j] useless (a tie keeps the earlier one)
        a, b = options[k], options[j]
        same = (a.saved_activation_bytes, a.forward_flops, pairs(a)) == (b.saved_activation_bytes, b.forward_flops,
                                                                         pairs(b))
        return (a.saved_activation_bytes >= b.saved_activation_bytes and a.forward_flops <= b.forward_flops
                and pairs(a) <= pairs(b) and (k < j or not same))

    first = 1 if options and options[0].module == name else 0  # the full option is always offered
    return tuple(o for j, o in enumerate(options)
                 if j < first or not any(beats(k, j) for k in range(len(options)) if k != j))


def _unreached(m: Measurement, module: str) -> tuple[str, ...]:
    """The modules inside ``module`` whose output its recomputation does not reach
    (:attr:`autoplan.graph.RecomputeOption.unreached`): those whose first call ends at or after the last
    position at which ``module``'s first call saved a tensor (an op's saves come one position after it)."""
    call = m.calls.get(module)
    if call is None:
        return ()
    # positions only grow in forward, so the last save in the call is the last at or before its end
    before_end = bisect.bisect_right(m.pack_positions, call.end)
    last = m.pack_positions[before_end - 1] if before_end and m.pack_positions[before_end - 1] > call.start \
        else call.start
    return tuple(sorted(fqn for fqn, c in m.calls.items()
                        if fqn != module and in_module(fqn, module) and c.end >= last))


def _bias_numel(model, fqn: str) -> int:
    bias = getattr(model.get_submodule(fqn), "bias", None)
    return bias.numel() if isinstance(bias, torch.Tensor) else 0


def _tp_groups_by_layer(groups: list[DetectedGroup], model, m: Measurement, op_graph, locator: LayerLocator):
    module_fwd, _ = per_module(m)
    out: dict[int, list[TensorParallelGroup]] = {}
    for group in groups:
        first, last = group.window
        if first not in m.calls:
            continue
        sharded = 0
        if last is not None and last in m.calls:
            # everything made from the first colwise op up to the rowwise op: colwise outputs and what derives
            # from them; vocabulary groups shard no saved tensor (the embedding output is all-reduced first)
            start, stop = m.calls[first].start, m.calls[last].start
            sharded = sum(rec.nbytes for rec in m.saved if start <= rec.producer < stop)
        layers = {locator.of_module(fqn) for fqn in group.styles}
        if len(layers) != 1 or None in layers:
            continue  # a group split across two links of the chain cannot be sharded inside one stage
        layer = layers.pop()
        out.setdefault(layer, []).append(
            TensorParallelGroup(
                styles=dict(group.styles),
                divisor=group.divisor,
                # a rowwise linear's bias is added after the all-reduce, whole on every rank (DTensor
                # RowwiseParallel replicates it): it is not sharded
                num_params=sum(module_params(model, fqn) - (_bias_numel(model, fqn) if style == "rowwise" else 0)
                               for fqn, style in group.styles.items()),
                forward_flops=sum(module_fwd.get(fqn, 0) for fqn in group.styles),
                activation_bytes=sharded,
                output_bytes=op_graph.nx.nodes[group.output_node]["bytes"],
                input_bytes=m.calls[first].input_bytes,
            )
        )
    return out
