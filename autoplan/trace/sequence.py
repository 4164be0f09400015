"""Which layers can run Megatron sequence parallelism, and what it shards (Korthikanti et al. 2022 §4.2.2).

Sequence parallelism splits a layer's residual stream over the tensor-parallel ranks along the sequence dim
outside its colwise → rowwise pairs; inside a pair the input is all-gathered and the output reduce-scattered. A
layer qualifies when, from one fake forward:

* it holds only Megatron pairs (no vocabulary-parallel module) and is not the model's root;
* its first positional input is a floating (batch, sequence, hidden) tensor and it returns one tensor of that
  shape (run once more on fake tensors with the recorded inputs): the stream that is split on entry and gathered
  on exit (the executor checks again that it returns the stream, as a DTensor);
* every module with parameters outside the pairs (not under a pair's parent module) is a norm — LayerNorm or
  RMSNorm, which act on each token alone — and there is at least one (else nothing would be gained).

Whatever else the layer does outside the pairs runs on DTensors at execution (see
:mod:`autoplan.execute.tensor_parallel`), which either gives the whole-tensor result or raises.

Example:
    >>> import torch, autoplan
    >>> from autoplan.models import GPT, GPTConfig
    >>> sp = autoplan.trace(GPT(GPTConfig()), torch.randint(0, 256, (2, 16))).layer("blocks.0").sequence_parallel
    >>> sp.norms, sp.sequence, sp.possible
    (('ln1', 'ln2'), 16, True)
"""

from __future__ import annotations

import torch
from torch import nn

from ..graph import SequenceParallelLayer, TensorParallelGroup
from ..names import in_module
from ..vocabulary import tp_style_kind
from .measure import Measurement, TensorSpec
from .repeat import block_signature

__all__ = ["input_owners", "sequence_parallel_layer", "is_norm"]


def is_norm(module: nn.Module) -> bool:
    """A per-token normalisation: ``nn.LayerNorm``, ``nn.RMSNorm`` or a class named ``…LayerNorm`` / ``…RMSNorm``
    (transformers' ``LlamaRMSNorm``); these act on each token alone, so they run on a sequence shard.

    Example:
        >>> is_norm(nn.LayerNorm(4)), is_norm(nn.BatchNorm1d(4))
        (True, False)
    """
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or name.endswith(("LayerNorm", "RMSNorm"))


def input_owners(styles_of_groups: list[dict[str, str]]) -> set[str]:
    """The modules whose inputs tracing records for this check: every proper ancestor (below the root) of a
    pair's modules, among which the layers will be.

    Example:
        >>> sorted(input_owners([{"blocks.0.attn.qkv": "colwise", "blocks.0.attn.proj": "rowwise"}]))
        ['blocks', 'blocks.0', 'blocks.0.attn']
    """
    out: set[str] = set()
    for styles in styles_of_groups:
        if "rowwise" not in styles.values():
            continue
        for fqn in styles:
            probe = fqn.rpartition(".")[0]
            while probe:
                out.add(probe)
                probe = probe.rpartition(".")[0]
    return out


def _returned(layer: nn.Module, recorded: tuple) -> object:
    """The shape of what ``layer`` returns for its recorded inputs (one forward on fake tensors, on the layer's
    device), or a short description when that is not one tensor."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils import _pytree as pytree

    import logging

    param = next(layer.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # a layer that cannot run alone is a reason, not an error to log
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            args, kwargs = pytree.tree_map(
                lambda x: torch.empty(x.shape, dtype=x.dtype, device=device) if isinstance(x, TensorSpec) else x,
                recorded)
            out = layer(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - reported as the reason sequence parallelism is not offered
        return f"nothing (it does not run alone on fake inputs: {type(error).__name__})"
    finally:
        quiet.setLevel(level)
    return tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__


def _returned_key(layer: nn.Module, recorded: tuple) -> tuple:
    """What :func:`_returned` reads: the layer's structure (:func:`autoplan.trace.repeat.block_signature`, the
    check that a stack's blocks repeat) and its recorded inputs (shapes and dtypes, plain values, any other object
    by identity). Two layers with equal keys run the same code on the same fake inputs."""
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten(recorded)
    inputs = tuple(("tensor", tuple(x.shape), x.dtype) if isinstance(x, TensorSpec)
                   else (type(x), x) if isinstance(x, (int, float, bool, str, type(None))) else ("object", id(x))
                   for x in leaves)
    return block_signature(layer), str(spec), inputs


def _blocked(reason: str) -> SequenceParallelLayer:
    return SequenceParallelLayer(blocker=reason)


def sequence_parallel_layer(model: nn.Module, name: str, groups: list[TensorParallelGroup], m: Measurement,
                            layer_activation_bytes: int, output_bytes: int,
                            returned: dict | None = None) -> SequenceParallelLayer | None:
    """What sequence parallelism would shard in layer ``name`` (its groups and saved bytes as traced), with the
    reason in ``blocker`` when it cannot run there; ``None`` for a layer without a Megatron pair.
    ``returned``: a memo of the layer's fake forward, shared by the layers of one trace (identical blocks given
    identical inputs run it once).

    Example: see the module docstring.
    """
    pairs = [g for g in groups if set(g.styles.values()) <= {"colwise", "rowwise"}
             and {"colwise", "rowwise"} <= set(g.styles.values())]
    if not pairs:
        return None
    if not name:
        return _blocked("the model's root is the layer; sequence parallelism splits a layer's input, so it needs "
                        "the pairs inside a submodule (a block)")
    if len(pairs) != len(groups):
        others = {fqn: style for g in groups if g not in pairs for fqn, style in g.styles.items()
                  if style not in ("colwise", "rowwise")}
        if any(tp_style_kind(style) in ("vocab_embedding", "vocab_head") for style in others.values()):
            return _blocked("the layer also holds a vocabulary-parallel module")
        listed = ", ".join(f"{fqn} ({style})" for fqn, style in sorted(others.items()))
        return _blocked(f"the layer also holds {listed or 'a group that is not a colwise → rowwise pair'}; sequence "
                        f"parallelism is built on plain colwise → rowwise pairs only")
    recorded = m.inputs.get(name)
    args = recorded[0] if recorded else ()
    first = args[0] if args else None
    if not isinstance(first, TensorSpec) or len(first.shape) != 3 or not first.dtype.is_floating_point:
        return _blocked("its first positional input is not a (batch, sequence, hidden) floating-point tensor")
    sequence = int(first.shape[1])
    stream_bytes = first.dtype.itemsize
    for size in first.shape:
        stream_bytes *= int(size)
    layer = model.get_submodule(name)
    if returned is None:
        shape = _returned(layer, recorded)
    else:
        key = _returned_key(layer, recorded)
        shape = returned[key] if key in returned else returned.setdefault(key, _returned(layer, recorded))
    if shape != tuple(first.shape):
        return _blocked(f"it returns {shape}, not one tensor shaped like its input {tuple(first.shape)}")
    paired = {fqn for g in pairs for fqn in g.styles}
    scopes = {fqn.rpartition(".")[0] for fqn in paired}  # a pair's parent: everything under it runs gathered
    norms = []
    for sub, module in layer.named_modules():
        fqn = f"{name}.{sub}" if sub else name
        if not sub or fqn in paired or not any(True for _ in module.parameters(recurse=False)):
            continue
        if any(in_module(fqn, scope) for scope in scopes if scope != name):
            continue
        if not is_norm(module):
            return _blocked(f"{fqn} ({type(module).__name__}) holds parameters outside the tensor-parallel pairs; "
                            f"only norms may run on a sequence shard")
        norms.append(sub)
    if not norms:
        return _blocked("it has no norm outside its tensor-parallel pairs, so there is nothing to shard")
    inner = sum(g.activation_bytes for g in pairs)
    shared = sum(g.input_bytes for g in pairs)
    colwise = [fqn for g in pairs for fqn, style in g.styles.items() if tp_style_kind(style) == "colwise"]
    gathered = sum(m.calls[c].input_bytes for c in colwise if c in m.calls)
    return SequenceParallelLayer(
        norms=tuple(norms), sequence=sequence,
        norm_params=tuple(p.numel() for n in norms for p in layer.get_submodule(n).parameters(recurse=False)),
        sharded_bytes=max(0, layer_activation_bytes - inner - shared), shared_input_bytes=shared,
        gathered_bytes=gathered,
    )
