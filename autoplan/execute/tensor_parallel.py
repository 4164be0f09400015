"""Tensor parallelism: the plan's per-module styles applied with DTensor ``parallelize_module``.

Styles (Megatron-LM, Shoeybi et al. 2019 §3): ``colwise`` → ``ColwiseParallel()`` (output features sharded),
``rowwise`` → ``RowwiseParallel()`` (input features sharded, output all-reduced), ``vocab_embedding`` →
``RowwiseParallel(input_layouts=Replicate())`` on an ``nn.Embedding`` (vocabulary rows sharded),
``vocab_head`` → ``ColwiseParallel(output_layouts=Replicate())`` (vocabulary sharded, logits gathered);
``colwise:K`` (a projection fusing K equal parts) → :class:`~autoplan.execute.tp_styles.FusedColwise`,
``colwise:a+b+c`` (unequal parts: Phi-3's qkv with grouped key/value heads) →
:class:`~autoplan.execute.tp_styles.FusedRowsColwise`, a
``…/dtensor`` colwise style → the same style handing on a global-shape DTensor (:mod:`autoplan.execute.tp_dtensor`:
nanoGPT's attention, whose views read sizes from its input), and GPT-2's
``Conv1D`` under ``colwise``/``rowwise`` → the ``Conv1D`` styles of :mod:`autoplan.execute.tp_styles`.
An attention module that keeps its head count in attributes (``num_heads``, ``embed_dim``…) gets them divided by
the tp degree, so code such as ``view(B, T, self.num_heads, head_dim)`` sees its local heads.
Weights tied before sharding (a GPT's ``head.weight is tok.weight``) are tied again afterwards; both styles shard
dim 0, so the tied weight keeps one DTensor and one gradient.

Sequence parallelism (Korthikanti et al. 2022 §4.2.2; ``plan.sequence_parallel``): inside each *sequence-parallel
layer* (a plan layer holding modules of style ``sequence``, its norms) the residual stream is a DTensor sharded on
the sequence dim, ``Shard(1)``. The layer's first input is split there (a local slice, as ``PrepareModuleInput``
does), its norms run on their own tokens (``SequenceParallel``: replicated weights), each colwise linear all-gathers
its input (from ``Shard(1)`` to the ``Replicate()`` its ``ColwiseParallel`` takes; linears sharing an input share
one gather and save its shard, as Megatron does: :mod:`autoplan.execute.sp_gather`; a plain input, such as
cross-attention's encoder states, is marked whole first), each rowwise linear reduce-scatters its output
(``RowwiseParallel(output_layouts=Shard(1))``), and the last layer of a run of such layers all-gathers its output
again (``PrepareModuleOutput``), so what follows (the final norm, the head, the loss) sees whole tensors. Between
those points every tensor of the residual stream is a DTensor, so an op the layer runs on it follows DTensor's
global-tensor semantics (or raises): a sequence-dependent op outside the pairs cannot silently see a shard. The norm
weights' gradients come back as partial sums over the tp ranks and are all-reduced once per step
(:func:`reduce_sequence_parallel_gradients`). A pipeline stage is given its own layers, so runs are cut at the stage
boundaries: each stage splits and gathers its own piece and stages exchange whole activations, as under plain tensor
parallelism (:func:`check_stage_outputs_whole` refuses a shard that would leave a stage).

Example:
    >>> from autoplan.execute.tensor_parallel import parallel_style
    >>> type(parallel_style("colwise")).__name__
    'ColwiseParallel'
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)
from torch.utils._pytree import tree_leaves

from ..errors import PlanMismatchError
from ..names import tied_parameter_names  # noqa: F401  (re-exported: apply and data_parallel use it)
from ..trace.tp_heads import divide_head_attributes, local_head_owners
from ..vocabulary import keeps_dtensor, tp_style_kind
from .sp_gather import SEQUENCE_DIM, keep_colwise_inputs_sharded
from .tp_dtensor import keep_fused_parts_local, register_cpu_attention_sharding
from .tp_styles import style_for

__all__ = ["parallel_style", "apply_tensor_parallel", "sequence_parallel_runs", "reduce_sequence_parallel_gradients",
           "check_stage_outputs_whole", "tied_parameter_names"]


def parallel_style(style: str, module: nn.Module | None = None, sequence_parallel: bool = False) -> ParallelStyle:
    """The torch ``ParallelStyle`` for a plan style name on ``module`` (``colwise``/``rowwise`` on a GPT-2
    ``Conv1D`` take the transposed-weight styles of :mod:`autoplan.execute.tp_styles`). ``sequence_parallel``: the
    module sits in a sequence-parallel layer (colwise gathers a sequence-sharded input, rowwise reduce-scatters to
    one and hands on a DTensor).

    Example:
        >>> type(parallel_style("vocab_embedding")).__name__
        'RowwiseParallel'
        >>> parallel_style("rowwise", sequence_parallel=True).output_layouts
        (Shard(dim=1),)
    """
    if tp_style_kind(style) in ("colwise", "rowwise"):
        # ColwiseParallel / RowwiseParallel, their Conv1D forms, or FusedColwise for colwise:K
        if not sequence_parallel:
            return style_for(style, module)
        if tp_style_kind(style) == "colwise":
            # Its input from the stream is a DTensor (a norm's output, or the layer's input), all-gathered from
            # Shard(1) to Replicate() by a hook of autoplan.execute.sp_gather before this style sees it (a second
            # redistribution here would turn the gradient's reduce-scatter into an all-reduce);
            # apply_tensor_parallel marks a plain input (cross-attention's encoder states) whole first, so that it
            # is never taken for a shard.
            return style_for(style, module, input_layouts=Replicate())
        # a DTensor out: the residual add and the next norm stay in DTensor semantics
        return style_for(style, module, output_layouts=Shard(SEQUENCE_DIM), use_local_output=False)
    if style == "sequence":
        return SequenceParallel(sequence_dim=SEQUENCE_DIM)
    if style == "vocab_embedding":
        return RowwiseParallel(input_layouts=Replicate())
    if style == "vocab_head":
        return ColwiseParallel(output_layouts=Replicate())
    raise ValueError(f"unknown tensor-parallel style {style!r}; use colwise, rowwise, vocab_embedding, vocab_head, "
                     f"sequence")


def _set_parameter(root: nn.Module, fqn: str, param: nn.Parameter) -> None:
    owner, _, leaf = fqn.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, leaf, param)


def _inside(fqn: str, layer: str) -> bool:
    return fqn == layer or fqn.startswith(layer + ".")


def sequence_parallel_runs(layers: list[str] | tuple[str, ...], styles: dict[str, str]) -> list[list[str]]:
    """The sequence-parallel layers among ``layers`` (in order: those holding a ``sequence``-style module), grouped
    into runs of neighbours: each run is split once on entry and gathered once on exit.

    Example:
        >>> sequence_parallel_runs(["tok", "blocks.0", "blocks.1", "ln_f"],
        ...                        {"blocks.0.ln1": "sequence", "blocks.1.ln1": "sequence"})
        [['blocks.0', 'blocks.1']]
    """
    runs: list[list[str]] = []
    previous = False
    for layer in layers:
        on = any(style == "sequence" and _inside(fqn, layer) for fqn, style in styles.items())
        if on and previous:
            runs[-1].append(layer)
        elif on:
            runs.append([layer])
        previous = on
    return runs


def apply_tensor_parallel(root: nn.Module, styles: dict[str, str], tp_mesh: DeviceMesh,
                          layers: list[str] | tuple[str, ...] = ()) -> int:
    """Shard the modules named in ``styles`` (FQNs relative to ``root``) over ``tp_mesh``; returns how many.
    ``layers``: this stage's plan layers in order, where ``sequence``-style modules mark sequence-parallel ones.

    Example (under torchrun with 2 ranks):
        ``apply_tensor_parallel(model, {"fc": "colwise", "proj": "rowwise"}, mesh["tp"])``
    """
    if not styles:
        return 0
    tied = tied_parameter_names(root)
    runs = sequence_parallel_runs(layers, styles)
    in_sp = [layer for run in runs for layer in run]
    for fqn, style in styles.items():
        if tp_style_kind(style) == "colwise" and any(_inside(fqn, layer) for layer in in_sp):
            root.get_submodule(fqn).register_forward_pre_hook(functools.partial(_whole_if_plain, tp_mesh),
                                                              prepend=True)
    parallelize_module(root, tp_mesh, {
        fqn: parallel_style(style, root.get_submodule(fqn), any(_inside(fqn, layer) for layer in in_sp))
        for fqn, style in styles.items()})
    # Megatron's storage: each shared colwise input gathered once, its shard saved, gathered again in backward
    paired = {kind: [f for f, s in styles.items() if tp_style_kind(s) == kind and any(_inside(f, x) for x in in_sp)]
              for kind in ("colwise", "rowwise")}
    keep_colwise_inputs_sharded(root, paired["colwise"], paired["rowwise"], in_sp)
    for run in runs:
        for layer in run:
            # The stream, the layer's first positional input (its other inputs pass as they are): PrepareModuleInput
            # for that one input, whatever the number of positional inputs the layer is called with.
            root.get_submodule(layer).register_forward_pre_hook(functools.partial(_split_stream, tp_mesh))
        last = root.get_submodule(run[-1])
        last.register_forward_hook(functools.partial(_check_stream_output, run[-1]))  # runs before the gather
        parallelize_module(last, tp_mesh, PrepareModuleOutput(
            output_layouts=(Shard(SEQUENCE_DIM),), desired_output_layouts=(Replicate(),), use_local_output=True))
    # An attention module that counts its heads in attributes now computes on its local heads (as torchtitan sets
    # n_heads // tp); tracing proved each group sound under exactly this change. A module whose colwise output
    # stays a global-shape DTensor keeps its global counts (its code sees global shapes) and cuts a fused output
    # into its parts locally (autoplan.execute.tp_dtensor).
    global_fqns = [f for f, s in styles.items() if keeps_dtensor(s)]
    if global_fqns:
        register_cpu_attention_sharding()
        for fqn in global_fqns:
            owner = fqn.rpartition(".")[0]
            keep_fused_parts_local(root.get_submodule(owner) if owner else root)
    divide_head_attributes(local_head_owners(root, [f for f, s in styles.items() if tp_style_kind(s) == "colwise"
                                                    and not keeps_dtensor(s)]), tp_mesh.size())
    params = dict(root.named_parameters(remove_duplicate=False))
    for names in tied:
        keep = params[names[0]]
        for name in names[1:]:
            other = params[name]
            if other is keep:
                continue
            placements = getattr(keep, "placements", None), getattr(other, "placements", None)
            if placements[0] != placements[1]:
                raise PlanMismatchError(
                    f"tied parameters {names} would be sharded differently by tensor parallelism "
                    f"({placements[0]} vs {placements[1]}); give their modules matching styles (vocab_embedding "
                    f"with vocab_head) or leave both unsharded, then re-plan"
                )
            _set_parameter(root, name, keep)
    return len(styles)


def _whole_if_plain(tp_mesh: DeviceMesh, module: nn.Module, args: tuple):
    """A colwise linear of a sequence-parallel layer: a plain input is a whole tensor from outside the stream
    (cross-attention's encoder states), so it becomes a replicated DTensor, which is not gathered."""
    if args and isinstance(args[0], torch.Tensor) and not isinstance(args[0], DTensor):
        return (DTensor.from_local(args[0], tp_mesh, (Replicate(),), run_check=False),) + tuple(args[1:])
    return None


def _split_stream(tp_mesh: DeviceMesh, module: nn.Module, args: tuple):
    """A sequence-parallel layer's first input as a DTensor sharded on the sequence: a whole tensor (the first layer
    of a run) is sliced to this rank's tokens, no communication; a DTensor from the previous layer of the run
    already is (or is redistributed to) ``Shard(1)``."""
    stream = args[0] if args else None
    if not isinstance(stream, torch.Tensor):  # the norms would take a whole tensor for a shard: refuse
        raise PlanMismatchError(
            f"a sequence-parallel layer ({type(module).__name__}) was called without its residual stream as its "
            f"first positional input; re-plan with sequence_parallel=False"
        )
    if not isinstance(stream, DTensor):
        stream = DTensor.from_local(stream, tp_mesh, (Replicate(),), run_check=False)
    if stream.placements != (Shard(SEQUENCE_DIM),):
        stream = stream.redistribute(tp_mesh, (Shard(SEQUENCE_DIM),))
    return (stream,) + tuple(args[1:])


def _check_stream_output(name: str, module: nn.Module, inputs, output) -> None:
    """The last layer of a sequence-parallel run must return the stream itself, one DTensor: gathering anything
    else (a plain tensor would be taken for a shard, a tuple) would be wrong or fail deep inside torch. A DTensor
    is gathered from whatever placement it has (a layer that reshapes the stream, as OPT flattens its tokens for
    its MLP, may hand it back sharded on another dim: right, at the price of DTensor's redistributions)."""
    if not isinstance(output, DTensor):
        raise PlanMismatchError(
            f"sequence-parallel layer {name!r} returned {type(output).__name__}, not its residual stream as a "
            f"DTensor; this model's layers cannot run sequence-parallel: re-plan with sequence_parallel=False"
        )


def check_stage_outputs_whole(stage: nn.Module, index: int) -> None:
    """A pipeline stage under sequence parallelism must hand the next stage whole tensors: each of its runs is
    gathered where it ends, but a run's inner output used past the stage (a layer's output read again by a later
    stage) would leave as a DTensor, whose local shard the pipeline would send as if it were whole. Checked on
    every forward (a hook); a ``PlanMismatchError`` before anything is sent.

    Example:
        >>> import torch
        >>> stage = torch.nn.Linear(2, 2)
        >>> check_stage_outputs_whole(stage, 0)
        >>> stage(torch.ones(1, 2)).shape
        torch.Size([1, 2])
    """

    def whole(module: nn.Module, inputs, output) -> None:
        if any(isinstance(x, DTensor) for x in tree_leaves(output)):
            raise PlanMismatchError(
                f"pipeline stage {index} would send a sequence-parallel DTensor to the next stage (a layer's output "
                f"inside a run of sequence-parallel layers is read past the stage's end); cut the stages at the end "
                f"of a layer whose output only the next layer reads, or re-plan with sequence_parallel=False"
            )

    stage.register_forward_hook(whole)


def reduce_sequence_parallel_gradients(modules) -> int:
    """All-reduce, over the tp ranks, each gradient that backward left as a partial sum of a replicated weight (a
    norm of a sequence-parallel layer saw only this rank's tokens); returns how many were reduced. Called once
    per step, after the last microbatch's backward (partial sums accumulate over microbatches as they are).

    Example:
        >>> import torch
        >>> reduce_sequence_parallel_gradients([torch.nn.LayerNorm(4)])
        0
    """
    count = 0
    for module in modules:
        for param in module.parameters():
            grad = param.grad
            if isinstance(grad, DTensor) and isinstance(param, DTensor) and grad.placements != param.placements \
                    and any(p.is_partial() for p in grad.placements):
                param.grad = grad.redistribute(grad.device_mesh, param.placements)
                count += 1
    return count
