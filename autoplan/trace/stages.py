"""Pipeline splitting at module level: one module per stage that keeps the original modules.

Two routes, both keeping every layer a real ``nn.Module`` under its original FQN: a ``torch.fx`` GraphModule per
stage (below) for models fx traces, and a skeleton of the model per stage (:mod:`autoplan.trace.skeleton`) for
those it does not (every transformers 5 model), which needs example inputs to prove its cuts sound.

The top-level forward is traced with ``torch.fx`` treating every plan layer as a leaf, so code between layers (a
GPT's ``tok(idx) + pos(arange(T))``, loops over blocks) is captured and the layers themselves stay real
``nn.Module`` objects under their original FQNs — tensor parallelism, recompute, FSDP and state dicts then address
them by name. Each node is assigned to a stage: a layer to the stage that lists it, a node computed from layer
outputs to the earliest stage where all its inputs exist, a node computed only from the model inputs (shapes,
``arange``) to the first stage that uses it. Values needed after stage ``k`` are passed on by stage ``k``.

Example:
    >>> import torch
    >>> from autoplan.trace.stages import split_into_stages
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> first, second = split_into_stages(model, [["0", "1"], ["2"]])
    >>> x = torch.randn(3, 4)
    >>> torch.equal(second(first(x)), model(x))
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn

from ..errors import TraceError
from .cut_proof import agreed_analysis, analyse_cuts
from .skeleton import skeleton_stages

__all__ = ["split_into_stages", "pipeline_split_blocker"]

_FREE = -1  # computed from model inputs or constants only: placed where first used


class _LayerLeafTracer(fx.Tracer):
    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


def pipeline_split_blocker(model: nn.Module, layers: Sequence[str] | None = None,
                           example_inputs: tuple[tuple, dict] | None = None) -> str | None:
    """Why ``model`` cannot be split into pipeline stages at ``layers`` (default: every submodule), or ``None`` when
    it can: its forward traces with torch.fx around them, or else (given ``example_inputs`` as ``(args, kwargs)``)
    :func:`autoplan.trace.cut_proof.analyse_cuts` proves every cut of the chain sound.

    Example:
        >>> from autoplan.models import MLP
        >>> pipeline_split_blocker(MLP(8, 16, depth=2)) is None
        True
    """
    leaves = set(layers) if layers is not None else {name for name, _ in model.named_modules() if name}
    try:
        _trace(model, leaves)
    except TraceError as exc:
        fx_reason = str(exc.__cause__ or exc)
        if example_inputs is None or layers is None:
            return fx_reason
        return analyse_cuts(model, list(layers), *example_inputs).blocker
    return None


def _trace(model: nn.Module, leaves: set[str]) -> fx.Graph:
    try:
        return _LayerLeafTracer(leaves).trace(model)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, NotImplementedError...)
        raise TraceError(
            f"pipeline parallelism splits {type(model).__name__}.forward with torch.fx around the plan's layers, "
            f"and that failed: {type(exc).__name__}: {exc}. Re-plan with mesh={{'pp': 1}} (data and tensor "
            f"parallelism do not need this trace), or move the data-dependent code into a layer module"
        ) from exc


def _assign(graph: fx.Graph, layer_stage: dict[str, int], last: int) -> dict[fx.Node, int]:
    stage: dict[fx.Node, int] = {}
    for node in graph.nodes:
        inputs = [stage[i] for i in node.all_input_nodes]
        earliest = max(inputs, default=_FREE)
        if node.op == "call_module" and node.target in layer_stage:
            stage[node] = layer_stage[node.target]
            if earliest > stage[node]:
                raise TraceError(
                    f"layer {node.target!r} is in pipeline stage {stage[node]} but uses a value computed in stage "
                    f"{earliest}; the plan's stages must follow the order in which forward runs the layers"
                )
        elif node.op == "output":
            stage[node] = last
        elif node.op == "placeholder":
            stage[node] = _FREE
        else:
            stage[node] = earliest
    for node in reversed(graph.nodes):  # free nodes run where they are first needed
        if stage[node] == _FREE:
            stage[node] = min((stage[u] for u in node.users), default=0)
            if node.op == "placeholder":
                stage[node] = 0
    return stage


def _stage_graph(graph: fx.Graph, stage: dict[fx.Node, int], k: int, inputs: list[fx.Node],
                 outputs: list[fx.Node] | None) -> fx.Graph:
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = new.placeholder(node.name)
        env[node].meta = dict(node.meta)
    output_args = None
    for node in graph.nodes:
        if stage[node] != k or node.op == "placeholder":
            continue
        if node.op == "output":
            output_args = fx.map_arg(node.args[0], lambda n: env[n])
            continue
        env[node] = new.node_copy(node, lambda n: env[n])
    if outputs is None:
        new.output(output_args)
    else:
        result = [env[n] for n in outputs]
        new.output(result[0] if len(result) == 1 else tuple(result))
    return new


def split_into_stages(model: nn.Module, stages: Sequence[Sequence[str]],
                      example_inputs: tuple[tuple, dict] | None = None) -> list[nn.Module]:
    """One module per stage; stage ``k`` takes what stage ``k-1`` returns (stage 0: the model's inputs) and the
    last returns the model's output. The stage modules share the model's submodules (no copies).

    A model torch.fx cannot trace is split into skeleton stages (:mod:`autoplan.trace.skeleton`) when
    ``example_inputs`` (``(args, kwargs)``, any batch size) are given: those stages have ``takes_model_inputs``
    set and every one of them takes the microbatch's inputs as ``model_inputs=(args, kwargs)``.

    Example:
        >>> from autoplan.models import GPT, GPTConfig
        >>> gpt = GPT(GPTConfig())
        >>> parts = split_into_stages(gpt, [["tok", "pos", "blocks.0"], ["blocks.1", "ln_f", "head"]])
        >>> sorted(name for name, _ in parts[1].named_children())
        ['blocks', 'head', 'ln_f']
    """
    layer_stage = {fqn: k for k, layers in enumerate(stages) for fqn in layers}
    last = len(stages) - 1
    try:
        graph = _trace(model, set(layer_stage))
    except TraceError as exc:
        if example_inputs is None:
            raise TraceError(f"{exc} Models that torch.fx cannot trace (transformers 5) are split with the help of "
                             f"example inputs: pass them to autoplan.parallelize") from exc.__cause__
        layers = [fqn for stage in stages for fqn in stage]
        analysis = agreed_analysis(model, layers, *example_inputs)  # once, on rank 0, when a group is up
        if analysis.blocker is not None:
            raise TraceError(f"{type(model).__name__} cannot be split into pipeline stages: {analysis.blocker}. "
                             f"Re-plan with mesh={{'pp': 1}} (data and tensor parallelism need no split)") from exc
        return skeleton_stages(model, stages, analysis)
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    unused = [fqn for fqn in layer_stage if fqn not in called]
    if unused:
        raise TraceError(
            f"the plan's layers {unused} are never called by {type(model).__name__}.forward as modules (a module "
            f"reused or reached only through another's attributes); re-plan with layers that forward calls"
        )
    stage = _assign(graph, layer_stage, last)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    order = {n: i for i, n in enumerate(graph.nodes)}
    boundaries: list[list[fx.Node]] = []  # boundaries[k]: values stage k hands to stage k+1
    for k in range(last):
        live = [n for n in graph.nodes if n.op != "output" and stage[n] <= k and any(stage[u] > k for u in n.users)]
        boundaries.append(sorted(live, key=order.__getitem__))
    modules = []
    for k in range(last + 1):
        inputs = placeholders if k == 0 else boundaries[k - 1]
        outputs = None if k == last else boundaries[k]
        if outputs is not None and not outputs:
            raise TraceError(f"pipeline stage {k} passes nothing to stage {k + 1}; check the plan's stage order")
        sub = fx.GraphModule(model, _stage_graph(graph, stage, k, inputs, outputs), class_name=f"Stage{k}")
        sub.register_forward_hook(_boundary_outputs(k, last))
        modules.append(sub)
    return modules


def _boundary_outputs(k: int, last: int):
    """A forward hook: what stage ``k`` hands on must be tensors, and contiguous (point-to-point sends need it;
    a slice of the input batch is not)."""

    def hook(module, args, output):
        if k == last:
            return None
        values = output if isinstance(output, tuple) else (output,)
        bad = [type(v).__name__ for v in values if not isinstance(v, torch.Tensor)]
        if bad:
            raise TraceError(
                f"pipeline stage {k} must hand only tensors to stage {k + 1} but hands {bad}; move the cut so that "
                f"no Python value (a shape, a list) crosses it, or re-plan with mesh={{'pp': 1}}"
            )
        values = tuple(v.contiguous() for v in values)
        return values if isinstance(output, tuple) else values[0]

    return hook
