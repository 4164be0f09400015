"""Find Megatron-style tensor-parallel groups in an op graph (Shoeybi et al. 2019, §3; SC'21 §2.3).

* colwise: the ``nn.Linear`` modules of one parent module that read the same tensor (attention q/k/v or a fused
  qkv; MLP fc, or gate and up); ``colwise:K`` when the output is cut on its last dim into K equal parts by
  ``split``/``chunk`` (a fused qkv: K = 3; a fused gate/up: K = 2), ``colwise:a+b+c`` when slices of unequal sizes
  cover it (Phi-3's qkv with grouped key/value heads), which the executor shards part by part;
* rowwise: the single ``nn.Linear`` of the same parent reached from the colwise outputs through other ops
  (activation, attention, reshapes) without another linear, and whose output leaves the block: it feeds a
  residual add, the model output, or a module outside the pair's (a block stacked straight onto the next one);
  then one all-reduce of its output per forward makes the pair exact, provided the pair's parent module hands the
  rest of the model nothing else (T5's first cross-attention returns a head-shaped position bias: left out);
* vocab_embedding: an ``nn.Embedding`` looked up with a model input (token ids);
* vocab_head: an ``nn.Linear`` whose output is the model output and whose features are a vocabulary size.

A vocabulary group whose weight or bias is tied to a parameter of a module outside every vocabulary group is left
out (one tensor cannot be sharded under one name and whole under the other).

``nn.Linear`` and GPT-2's ``Conv1D`` (the same map with its weight stored as ``(in, out)``) count as linears; the
executor shards a ``Conv1D``'s weight on the transposed dims. The divisor is the number of heads when a colwise
output is viewed into heads (the dim that follows the dims the view keeps), else the gcd of the output features.

Example:
    >>> import torch, autoplan
    >>> from autoplan.models import GPT, GPTConfig
    >>> g = autoplan.trace(GPT(GPTConfig()), torch.randint(0, 256, (2, 16)))
    >>> [sorted(group.styles.items()) for group in g.layer("blocks.0").tp_groups][0]
    [('blocks.0.attn.proj', 'rowwise'), ('blocks.0.attn.qkv', 'colwise')]
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

from torch import nn

from ..vocabulary import FUSED_COLWISE
from .opgraph import OpGraph, is_conv1d

__all__ = ["DetectedGroup", "detect_tp_groups", "linear_features"]

_PASS_THROUGH = {"view", "reshape", "_unsafe_view", "getitem", "float", "to", "contiguous", "clone", "_to_copy",
                 "dropout", "type_as", "flatten", "identity"}

_FEATURE_REDUCTIONS = {"layer_norm", "native_layer_norm", "rms_norm", "group_norm", "batch_norm", "mean",
                       "var_mean", "norm"}


@dataclass(frozen=True)
class DetectedGroup:
    styles: dict[str, str]  # module FQN → style
    divisor: int
    output_node: str  # graph node whose tensor is all-reduced / all-gathered
    window: tuple[str, str | None]  # (first colwise module, the rowwise one): saved bytes made between are sharded


def _base_target(target: str) -> str:
    return target.split(".")[0]


def _parent(fqn: str) -> str:
    return fqn.rpartition(".")[0]


def _reaches_output(g, start: str, depth: int = 4) -> bool:
    frontier = [start]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for s in g.successors(n):
                if g.nodes[s]["op"] == "output":
                    return True
                if _base_target(g.nodes[s]["target"]) in _PASS_THROUGH:
                    nxt.append(s)
        frontier = nxt
    return False


def _inside(module: str, scope: str) -> bool:
    return scope == "" or module == scope or module.startswith(scope + ".")


def _passes_through(attrs: dict, modules: dict) -> bool:
    """An op that hands on its input's features as they are: a pass-through function, or a parameter-free
    ``nn.Dropout``/``nn.Identity`` module (nanoGPT's ``resid_dropout`` after its rowwise projection)."""
    if attrs["op"] == "call_module":
        return isinstance(modules.get(attrs["target"]), (nn.Dropout, nn.Identity))
    return _base_target(attrs["target"]) in _PASS_THROUGH


def _leaves_block(g, start: str, scope: str, depth: int = 4, modules: dict | None = None) -> bool:
    """Whether the rowwise output leaves the pair's block whole: it reaches a residual add, the model output, or
    (a block stacked straight onto the next one, with no residual) an op of a module outside ``scope``, the module
    the pair was found in. The all-reduce makes the output whole, so any reader outside the block is sound; what is
    refused is a "rowwise" linear whose output goes on inside its block (an inner linear of a deeper chain)."""
    frontier = [start]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for s in g.successors(n):
                target = _base_target(g.nodes[s]["target"])
                if g.nodes[s]["op"] == "output" or target in ("add", "add_", "iadd"):
                    return True
                if not _inside(g.nodes[s]["module"], scope):
                    return True
                if _passes_through(g.nodes[s], modules or {}) or target in ("mul",):
                    nxt.append(s)
        frontier = nxt
    return False


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight ``(in, out)``).

    Example:
        >>> linear_features(nn.Linear(8, 4))
        (8, 4)
    """
    if is_conv1d(module):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def _input_of(g, node: str, fqn: str) -> str | None:
    """The tensor a linear reads: ``linear``'s first argument; for a ``Conv1D`` (traced as ``view → addmm →
    view``), the tensor that enters its module."""
    current = node
    while current is not None and g.nodes[current]["module"] == fqn:
        attrs = g.nodes[current]
        args = attrs["args"]
        if _base_target(attrs["target"]) == "linear":
            return args[0] if args else None
        index = 1 if _base_target(attrs["target"]) == "addmm" else 0
        current = args[index] if len(args) > index else None
    return current


def _fused_parts(g, node: str, out_features: int, order: dict[str, int]) -> tuple[tuple[int, ...], list[str]]:
    """``(part sizes, part nodes)`` when the projection's output is cut on its last dim into parts: K equal ones
    (``split`` / ``chunk``, or K equal slices that cover it: a fused qkv or gate/up), or unequal slices that cover it
    (Phi-3's ``qkv_proj`` with grouped key/value heads: ``qkv[..., :q]``, ``qkv[..., q:q + kv]``, …), taken in the
    order the code slices them (the soundness check proves that order, or drops the group); ``((), [])`` otherwise.
    ``order``: each node's position in the graph."""
    shape = g.nodes[node]["shape"] or ()

    def same_but_last(piece: tuple) -> bool:
        return len(piece) == len(shape) and piece[:-1] == shape[:-1]

    slices = sorted((s for s in g.successors(node) if _base_target(g.nodes[s]["target"]) == "slice"
                     and same_but_last(g.nodes[s]["shape"] or ())), key=order.get)
    widths = [g.nodes[s]["shape"][-1] for s in slices]
    if len(slices) > 1 and all(widths) and sum(widths) == out_features:
        return tuple(widths), slices
    for s in g.successors(node):
        if _base_target(g.nodes[s]["target"]) not in ("split", "split_with_sizes", "chunk"):
            continue
        pieces = [p for p in g.successors(s) if _base_target(g.nodes[p]["target"]) == "getitem"]
        shapes = [g.nodes[p]["shape"] or () for p in pieces]
        widths = {p[-1] for p in shapes if same_but_last(p)}
        if len(widths) == 1 and len(shapes) == len(pieces):
            width = widths.pop()
            if 0 < width < out_features and out_features % width == 0:
                return (width,) * (out_features // width), pieces
    return (), []


def _colwise_style(sizes: tuple[int, ...]) -> str:
    """The plan style of a colwise projection cut into parts of ``sizes`` (none: not fused)."""
    if len(sizes) < 2:
        return "colwise"
    if len(set(sizes)) == 1:
        return f"{FUSED_COLWISE}{len(sizes)}"
    return FUSED_COLWISE + "+".join(map(str, sizes))


def _heads_or_features(g, node: str, out_features: int) -> int:
    """Heads when the linear's output is viewed into (…, heads, …, head_dim), else its output features."""
    shape = g.nodes[node]["shape"] or ()
    for s in g.successors(node):
        attrs = g.nodes[s]
        if _base_target(attrs["target"]) in ("view", "reshape", "_unsafe_view") and attrs["shape"]:
            view = attrs["shape"]
            keep = 0
            while keep < min(len(shape), len(view)) - 1 and shape[keep] == view[keep]:
                keep += 1
            if len(view) > len(shape) and keep < len(view):
                return int(view[keep])
    return out_features


def detect_tp_groups(op_graph: OpGraph, model: nn.Module,
                     refused: list[tuple[dict[str, str], str]] | None = None) -> list[DetectedGroup]:
    """Every tensor-parallel group found in ``op_graph`` (see the module docstring for the rules). Pairs left out
    because their parent hands out another tensor are appended to ``refused`` as ``(styles, reason)``."""
    g = op_graph.nx
    modules = dict(model.named_modules())
    linear_nodes = op_graph.linear_of
    groups: list[DetectedGroup] = []

    vocab_sizes: set[int] = set()
    placeholders = {n for n in op_graph.order if g.nodes[n]["op"] == "placeholder"}
    for node, fqn in op_graph.embedding_of.items():
        indices = [a for a in g.nodes[node]["args"] if a in placeholders]
        if indices:
            vocab = modules[fqn].num_embeddings
            vocab_sizes.add(vocab)
            groups.append(DetectedGroup({fqn: "vocab_embedding"}, vocab, node, (fqn, None)))

    by_input: dict[tuple[str, str], list[str]] = {}
    for node, fqn in linear_nodes.items():
        source = _input_of(g, node, fqn)
        if source is not None:
            by_input.setdefault((source, _parent(fqn)), []).append(node)

    # colwise linears grouped by the rowwise linear they flow into: projections of one parent reading different
    # tensors (cross-attention: q from the decoder, k and v from the encoder output) join one group
    col_by_row: dict[str, list[str]] = {}
    for (_, parent), col_nodes in by_input.items():
        # The pair usually shares a parent (attn.qkv / attn.proj); BERT-style models put the projections in
        # sibling modules (attention.self.query / attention.output.dense), so try one level up as well.
        scope, row = parent, _find_rowwise(g, col_nodes, parent, op_graph, modules)
        if row is None and "." in parent:
            scope = _parent(parent)
            row = _find_rowwise(g, col_nodes, scope, op_graph, modules)
        if row is not None and _leaves_block(g, row, scope, modules=modules):
            col_by_row.setdefault(row, []).extend(col_nodes)
    used: set[str] = set()
    order = {n: i for i, n in enumerate(op_graph.order)}
    for row, col_nodes in col_by_row.items():
        if row in used or any(c in used or c in col_by_row for c in col_nodes):
            continue
        divisor = 0
        styles = {}
        for c in col_nodes:
            out_features = linear_features(modules[linear_nodes[c]])[1]
            sizes, pieces = _fused_parts(g, c, out_features, order)
            styles[linear_nodes[c]] = _colwise_style(sizes)
            # a fused projection's heads show in the views of its parts (grouped key/value heads: the divisor
            # divides the key/value heads too, so each rank holds whole ones with their query heads)
            for piece, width in zip(pieces, sizes) if pieces else [(c, out_features)]:
                divisor = gcd(divisor, _heads_or_features(g, piece, width))
        divisor = gcd(divisor, linear_features(modules[linear_nodes[row]])[0])
        styles[linear_nodes[row]] = "rowwise"
        parent = _common_parent(list(styles))
        if _hands_out_more(g, op_graph.order, parent, row):
            if refused is not None:
                refused.append((styles, f"{parent} hands the rest of the model a tensor besides its rowwise output "
                                        f"(a position bias or attention weights shaped by its heads), which a shard "
                                        f"would make with the local heads only"))
            continue
        used.update(col_nodes)
        used.add(row)
        groups.append(DetectedGroup(styles, divisor, row, (linear_nodes[col_nodes[0]], linear_nodes[row])))

    for node, fqn in linear_nodes.items():
        out_features = linear_features(modules[fqn])[1]
        if node not in used and out_features in vocab_sizes and _reaches_output(g, node):
            groups.append(DetectedGroup({fqn: "vocab_head"}, out_features, node, (fqn, None)))
    vocab = {fqn for grp in groups for fqn, style in grp.styles.items() if style.startswith("vocab")}
    return [grp for grp in groups if not _tied_outside(model, grp.styles, vocab)]


def _common_parent(fqns: list[str]) -> str:
    """The innermost module holding every one of ``fqns`` (the module the soundness check shards)."""
    parts = [f.split(".") for f in fqns]
    common = []
    for names in zip(*(p[:-1] for p in parts)):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    return ".".join(common)


def _hands_out_more(g, order: list[str], parent: str, row: str) -> bool:
    """Whether the pair's parent module hands the rest of the model a tensor other than what it makes from the
    rowwise output: the all-reduce makes only that one whole. T5's cross-attention returns a zero position bias
    shaped by its head count, which later blocks add to their scores: with the heads divided by t on the shard,
    that tensor (and an attention-weights tensor read outside) would be a shard's, not the model's."""
    if parent == "":
        return False
    downstream, pending = {row}, [row]
    while pending:  # what the parent makes from the rowwise output (residual add, norm, dropout): whole
        for s in g.successors(pending.pop()):
            if s not in downstream and _inside(g.nodes[s]["module"], parent):
                downstream.add(s)
                pending.append(s)
    for n in order:
        attrs = g.nodes[n]
        if attrs["op"] in ("placeholder", "output") or n in downstream or not _inside(attrs["module"], parent):
            continue
        if any(g.nodes[s]["op"] == "output" or not _inside(g.nodes[s]["module"], parent) for s in g.successors(n)):
            return True
    return False


def _tied_outside(model: nn.Module, styles: dict[str, str], vocab: set[str]) -> bool:
    """Whether a vocabulary group's tensor is also a parameter of a module no vocabulary style shards (BERT ties
    its head's bias to ``cls.predictions.bias``): sharding one name of a tied tensor and not the other cannot be."""
    if not any(style.startswith("vocab") for style in styles.values()):
        return False
    owners: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), set()).add(name.rpartition(".")[0])
    for fqn in styles:
        for p in model.get_submodule(fqn).parameters(recurse=False):
            if any(owner not in vocab for owner in owners[id(p)]):
                return True
    return False


def _is_feature_reduction(attrs: dict, modules: dict) -> bool:
    """Norms reduce over the features that tensor parallelism shards: a colwise/rowwise region cannot hold one."""
    if attrs["op"] == "call_module":
        return "Norm" in type(modules.get(attrs["target"])).__name__
    return _base_target(attrs["target"]) in _FEATURE_REDUCTIONS


def _find_rowwise(g, col_nodes: list[str], parent: str, op_graph: OpGraph, modules: dict) -> str | None:
    """The one linear under ``parent`` that the colwise outputs flow into, or None when there is not exactly one."""
    found: set[str] = set()
    seen = set(col_nodes)
    pending = list(col_nodes)
    while pending:
        node = pending.pop()
        for s in g.successors(node):
            if s in seen:
                continue
            seen.add(s)
            attrs = g.nodes[s]
            if attrs["op"] == "output":
                return None
            module = attrs["module"]
            if not (module == parent or module.startswith(parent + ".")) or (parent == "" and module == ""):
                continue  # left the parent module (the residual stream): not part of the region
            if s in op_graph.linear_of:
                found.add(s)
                continue
            if _is_feature_reduction(attrs, modules) and len(attrs["shape"] or ()) < 4:
                return None  # a norm over the features; over one head's features (Qwen3's q/k norms) it may stay
            pending.append(s)
    return found.pop() if len(found) == 1 else None
