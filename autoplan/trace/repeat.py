"""Tracing a stack of identical blocks once: a reduced-depth copy is traced and its blocks replicated.

A transformer's cost lies in a ``ModuleList`` of N identical blocks; tracing all of them (fake-tensor forward
and backward, the op graph, the tensor-parallel check) costs N times one block for N identical answers. When
every block of the deepest stack has one structural signature (:func:`block_signature`: the class and relative
name of every submodule, every parameter's and buffer's shape, dtype and ``requires_grad``, and every plain
attribute; only an int attribute holding each block's own index, a ``layer_idx``, may differ), the model is
traced with only its first :data:`TRACED_BLOCKS` blocks — a shallow copy of the modules on the path to the
stack, so the user's model is never changed — and:

* block 0 is kept as traced (it is the first to read what every block reads, e.g. Llama's rotary tables,
  whose storage is counted once, there);
* blocks 1 … N−2 are block 1 (and 2) of the copy under their own names: a block between two blocks;
* block N−1 is the last block of the copy: a block followed by the model's tail.

It is checked, not assumed: blocks 1 and 2 of the copy must trace to the same layer (figures, tensor-parallel
groups, recompute options, op subgraph: every node's op, target, shape, dtype, bytes, relative module and
in-block edges), so a middle block is seen to repeat; the layer chain of the copy must be the expected one;
and no parameter of the stack may be shared. When any check fails, or the copy does not trace, the model is
traced in full. The result equals the full trace's field by field (tested on a GPT and a transformers Llama);
only the op graph's node names of the replicated blocks differ (``<name>@<block>``).

Example:
    >>> from autoplan.models import GPT, GPTConfig
    >>> stack = repeated_stack(GPT(GPTConfig(layers=8)))
    >>> stack.container, stack.depth
    ('blocks', 8)
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace
from typing import Callable

import networkx as nx
import torch
from torch import nn

from ..graph import Layer, ModelGraph
from ..names import in_module, tied_parameter_names

__all__ = ["RepeatedStack", "repeated_stack", "block_signature", "trace_repeated", "TRACED_BLOCKS",
           "MIN_DEPTH"]

#: blocks traced in the reduced copy: the first, two middle ones that must agree, and the last
TRACED_BLOCKS = 4
#: stacks shallower than this are traced in full (the copy would save little)
MIN_DEPTH = 8

_SIMPLE = (int, float, bool, str, type(None))


@dataclass(frozen=True)
class RepeatedStack:
    """A container (``ModuleList``/``Sequential``) of ``depth`` blocks with one structural signature."""

    container: str  # FQN of the container
    depth: int

    def block(self, i: int) -> str:
        return f"{self.container}.{i}" if self.container else str(i)


def block_signature(block: nn.Module) -> tuple:
    """Everything about ``block`` that can change its trace.

    Submodule classes and relative names, parameter and buffer shapes/dtypes/``requires_grad``, hooks, and the
    plain attributes (numbers, strings, tuples of them) of every submodule; any other object attribute counts
    by identity (a config shared by every block is the same object).

    Example:
        >>> block_signature(nn.Linear(4, 4)) == block_signature(nn.Linear(4, 4)) != block_signature(nn.Linear(4, 8))
        True
    """
    out: list = []
    for name, sub in block.named_modules(remove_duplicate=False):
        out.append(("m", name, type(sub).__qualname__, type(sub).__module__))
        hooks = (sub._forward_hooks, sub._forward_pre_hooks, sub._backward_hooks,
                 getattr(sub, "_backward_pre_hooks", {}))
        out.append(("h", name, tuple(len(h) for h in hooks)))
        for key, value in sorted(vars(sub).items()):
            if key.startswith("_") or key == "training":
                continue
            out.append(("a", name, key, _attribute(value)))
        for pname, p in sub.named_parameters(recurse=False):
            out.append(("p", name, pname, tuple(p.shape), p.dtype, p.requires_grad))
        for bname, b in sub.named_buffers(recurse=False):
            out.append(("b", name, bname, tuple(b.shape), b.dtype, bname in sub._non_persistent_buffers_set))
    return tuple(out)


def _attribute(value):
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value):
        return tuple(value)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    return ("object", id(value))  # a shared config or function is the same object in every block


def _same_but_index(signatures: list[tuple]) -> bool:
    """All signatures equal, except int attributes that hold each block's own index (a ``layer_idx``)."""
    first = signatures[0]
    for i, sig in enumerate(signatures[1:], start=1):
        if len(sig) != len(first):
            return False
        for a, b in zip(first, sig):
            if a != b and not (a[0] == b[0] == "a" and a[:3] == b[:3] and type(a[3]) is type(b[3]) is int
                               and (a[3], b[3]) == (0, i)):
                return False
    return True


def repeated_stack(model: nn.Module) -> RepeatedStack | None:
    """The deepest container of at least :data:`MIN_DEPTH` distinct blocks that all share one signature and no
    parameter (with each other or the rest of the model), or ``None``.

    Example:
        >>> repeated_stack(nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)]))
        RepeatedStack(container='', depth=8)
        >>> repeated_stack(nn.Sequential(*[nn.Linear(4, 4) for _ in range(7)] + [nn.Linear(4, 8)])) is None
        True
    """
    best: RepeatedStack | None = None
    shared = {name for names in tied_parameter_names(model) for name in names}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < MIN_DEPTH:
            continue
        if best is not None and len(mod) <= best.depth:
            continue
        keys = list(mod._modules)
        blocks = [mod._modules[k] for k in keys]
        if keys != [str(i) for i in range(len(keys))] or len({id(b) for b in blocks}) != len(blocks):
            continue
        if any(b is None or "forward" in vars(b) for b in blocks):
            continue
        if not _same_but_index([block_signature(b) for b in blocks]):
            continue
        stack = RepeatedStack(name, len(blocks))
        if any(in_module(p, stack.container) for p in shared if stack.container) or (not name and shared):
            continue
        best = stack
    return best


def reduced_copy(model: nn.Module, stack: RepeatedStack, keep: int) -> nn.Module:
    """A shallow copy of ``model`` whose stack holds its first ``keep`` blocks (the same block objects); the
    modules on the path to the stack are copied, nothing of ``model`` changes.

    Example:
        >>> m = nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)])
        >>> r = reduced_copy(m, RepeatedStack("", 8), 3)
        >>> len(r), len(m), r[2] is m[2]
        (3, 8, True)
    """
    path = stack.container.split(".") if stack.container else []

    def rebuilt(module: nn.Module, rest: list[str]) -> nn.Module:
        clone = copy.copy(module)
        if rest:
            clone._modules = dict(module._modules)
            clone._modules[rest[0]] = rebuilt(module._modules[rest[0]], rest[1:])
        else:
            clone._modules = {str(i): module._modules[str(i)] for i in range(keep)}
        return clone

    return rebuilt(model, path)


def trace_repeated(model: nn.Module, trace_full: Callable[[nn.Module], ModelGraph],
                   finish: Callable[[ModelGraph, nn.Module], ModelGraph]) -> ModelGraph | None:
    """The model's :class:`ModelGraph` from a trace of a reduced copy (``trace_full`` on it), or ``None`` when
    the model has no repeated stack or a check fails (the caller then traces it in full). ``finish`` recomputes
    the fields that depend on the whole model (totals, fingerprint, tied names, pipeline split).

    Example:
        >>> import torch
        >>> from autoplan.models import GPT, GPTConfig
        >>> from autoplan.trace import trace
        >>> graph = trace(GPT(GPTConfig(layers=8)), torch.randint(0, 256, (2, 16)))
        >>> [layer.name for layer in graph.layers][-4:], graph.layer("blocks.7").kind == graph.layer("blocks.3").kind
        (['blocks.6', 'blocks.7', 'ln_f', 'head'], True)
    """
    stack = repeated_stack(model)
    if stack is None:
        return None
    try:
        reduced = trace_full(reduced_copy(model, stack, TRACED_BLOCKS))
    except Exception:  # noqa: BLE001 - a copy that does not trace (forward indexes every block): trace in full
        return None
    expanded = _expand(reduced, stack)
    return None if expanded is None else finish(expanded, model)


def _expand(reduced: ModelGraph, stack: RepeatedStack) -> ModelGraph | None:
    names = [layer.name for layer in reduced.layers]
    blocks = [stack.block(i) for i in range(TRACED_BLOCKS)]
    if blocks[0] not in names:
        return None
    p = names.index(blocks[0])
    if names[p:p + TRACED_BLOCKS] != blocks or any(in_module(n, stack.container) for n in names[:p]
                                                   + names[p + TRACED_BLOCKS:] if stack.container):
        return None
    mid, last = reduced.layers[p + 1], reduced.layers[p + 2]
    if _renamed_layer(mid, stack, 1, 2, mid.index + 1) != last:
        return None
    ops = _block_nodes(reduced.nx_graph, stack)
    if not _same_subgraph(reduced.nx_graph, ops, stack):
        return None

    n, depth = TRACED_BLOCKS, stack.depth
    layers: list[Layer] = list(reduced.layers[:p + n - 1])
    layers += [_renamed_layer(reduced.layers[p + 2], stack, 2, j, 0) for j in range(n - 1, depth - 1)]
    layers.append(_renamed_layer(reduced.layers[p + n - 1], stack, n - 1, depth - 1, 0))
    layers += reduced.layers[p + n:]
    layers = [replace(layer, index=i) for i, layer in enumerate(layers)]
    dropped = []
    for styles, reason in reduced.tp_dropped:
        owner = _block_index(next(iter(styles), ""), stack)
        if owner == 2:
            dropped += [_renamed_dropped(styles, reason, stack, 2, j) for j in range(2, depth - 1)]
        elif owner == n - 1:
            dropped.append(_renamed_dropped(styles, reason, stack, n - 1, depth - 1))
        else:
            dropped.append((styles, reason))
    return replace(reduced, layers=layers, nx_graph=_expanded_graph(reduced.nx_graph, ops, stack),
                   tp_dropped=dropped)


# ------------------------------------------------------------------------------------------------ renaming


def _block_index(fqn: str, stack: RepeatedStack) -> int | None:
    prefix = f"{stack.container}." if stack.container else ""
    if not fqn.startswith(prefix):
        return None
    head = fqn[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _rename(fqn: str, stack: RepeatedStack, src: int, dst: int) -> str:
    old, new = stack.block(src), stack.block(dst)
    if fqn == old:
        return new
    return new + fqn[len(old):] if fqn.startswith(old + ".") else fqn


def _renamed_text(text: str, stack: RepeatedStack, src: int, dst: int) -> str:
    """A message with the block's FQN (alone or as a prefix) replaced by another block's."""
    return re.sub(rf"(?<![\w.]){re.escape(stack.block(src))}(?!\w)", stack.block(dst), text)


def _renamed_layer(layer: Layer, stack: RepeatedStack, src: int, dst: int, index: int) -> Layer:
    def ren(fqn: str) -> str:
        return _rename(fqn, stack, src, dst)

    sequence = getattr(layer, "sequence_parallel", None)
    if sequence is not None and sequence.blocker:
        layer = replace(layer, sequence_parallel=replace(
            sequence, blocker=_renamed_text(sequence.blocker, stack, src, dst)))
    return replace(
        layer, name=ren(layer.name), index=index, param_names=tuple(ren(n) for n in layer.param_names),
        tp_groups=tuple(replace(g, styles={ren(k): v for k, v in g.styles.items()}) for g in layer.tp_groups),
        recompute_options=tuple(replace(o, module=ren(o.module), unreached=tuple(ren(u) for u in o.unreached))
                                for o in layer.recompute_options),
    )


def _renamed_dropped(styles: dict, reason: str, stack: RepeatedStack, src: int, dst: int):
    return {_rename(k, stack, src, dst): v for k, v in styles.items()}, _renamed_text(reason, stack, src, dst)


# ----------------------------------------------------------------------------------------------- op graph


def _block_nodes(g: nx.DiGraph, stack: RepeatedStack) -> list[list[str]]:
    """The op graph's nodes of each traced block, in execution order."""
    out: list[list[str]] = [[] for _ in range(TRACED_BLOCKS)]
    for name, attrs in g.nodes(data=True):
        i = _block_index(attrs.get("module", ""), stack)
        if i is not None and i < TRACED_BLOCKS and in_module(attrs["module"], stack.block(i)):
            out[i].append(name)
    return out


def _node_key(g: nx.DiGraph, name: str, stack: RepeatedStack, block: int) -> tuple:
    attrs = g.nodes[name]
    target = attrs.get("target")
    if attrs["op"] == "call_module":
        target = _rename(target, stack, block, 0)
    module = _rename(attrs["module"], stack, block, 0)
    return (attrs["op"], str(target), attrs.get("shape"), str(attrs.get("dtype")), attrs.get("bytes"),
            attrs.get("is_tensor"), module)


def _same_subgraph(g: nx.DiGraph, ops: list[list[str]], stack: RepeatedStack) -> bool:
    """Blocks 1 and 2 have the same nodes in the same order, the same edges inside, and read the block before
    them at the same places (the repeat the replication relies on)."""
    a, b = ops[1], ops[2]
    if not a or len(a) != len(b):
        return False
    if any(_node_key(g, x, stack, 1) != _node_key(g, y, stack, 2) for x, y in zip(a, b)):
        return False
    pos = [{name: i for i, name in enumerate(block)} for block in ops]
    for x, y in zip(a, b):
        into_a = sorted(_source(p, pos, 1) for p in g.predecessors(x))
        into_b = sorted(_source(p, pos, 2) for p in g.predecessors(y))
        if into_a != into_b:
            return False
    return True


def _source(pred: str, pos: list[dict[str, int]], block: int) -> tuple:
    """Where an edge into ``block`` comes from: this block (position), the block before (position), or a
    named node outside the stack's traced blocks."""
    if pred in pos[block]:
        return ("self", pos[block][pred])
    if pred in pos[block - 1]:
        return ("previous", pos[block - 1][pred])
    if any(pred in p for p in pos):
        return ("block", pred)  # another block's node: not a pattern the replication follows
    return ("outside", pred)


def _expanded_graph(g: nx.DiGraph, ops: list[list[str]], stack: RepeatedStack) -> nx.DiGraph:
    """The op graph with block 2 replicated as blocks 3 … N−2 and the last traced block renamed N−1, in
    execution order; edges and ``args`` from the block before follow the copy before."""
    n, depth = TRACED_BLOCKS, stack.depth
    last = ops[n - 1]
    names: dict[int, list[str]] = {1: ops[1], 2: ops[2]}
    for j in range(n - 1, depth):
        names[j] = [f"{name}@{stack.block(j)}" for name in (ops[2] if j < depth - 1 else last)]
    out = nx.DiGraph()

    def add_copy(j: int) -> None:
        src, block = (ops[2], 2) if j < depth - 1 else (last, n - 1)
        own = {name: i for i, name in enumerate(src)}
        before = {name: i for i, name in enumerate(ops[block - 1])}

        # export names a block's weights after their FQN (p_model_layers_2_mlp_up_proj_weight)
        weight_old, weight_new = (f"{stack.block(i).replace('.', '_')}_" for i in (block, j))

        def mapped(p: str) -> str:
            if p in own:
                return names[j][own[p]]
            if p in before:
                return names[j - 1][before[p]]
            return p.replace(weight_old, weight_new, 1) if p not in g else p

        for i, name in enumerate(src):
            attrs = dict(g.nodes[name])
            attrs["module"] = _rename(attrs["module"], stack, block, j)
            if attrs["op"] == "call_module":
                attrs["target"] = _rename(attrs["target"], stack, block, j)
            attrs["args"] = tuple(mapped(a) for a in attrs.get("args", ()))
            out.add_node(names[j][i], **attrs)
            for p in g.predecessors(name):
                out.add_edge(mapped(p), names[j][i])

    after_last = {name: names[depth - 1][i] for i, name in enumerate(last)}
    for name, attrs in g.nodes(data=True):
        if name in after_last:
            if name == last[0]:
                for j in range(n - 1, depth):
                    add_copy(j)
            continue
        attrs = dict(attrs)
        attrs["args"] = tuple(after_last.get(a, a) for a in attrs.get("args", ()))
        out.add_node(name, **attrs)
        for p in g.predecessors(name):
            out.add_edge(after_last.get(p, p), name)
    return out
