"""The all-to-alls of a projection of unequal fused parts (``colwise:a+b+c``, Phi-3's ``qkv_proj`` with grouped
key/value heads) under tensor parallelism.

The executor (:class:`autoplan.execute.tp_styles.FusedRowsColwise`) stores such a weight ``Shard(0)``, rows r of t of
the whole fused weight, and computes with rows r of t of every part: per forward, one all-to-all over the tp ranks
per exchanged tensor (the weight, and a bias if there is one) hands each rank its compute rows, and in backward the
inverse all-to-all hands the gradient rows back. Each all-to-all's send buffer is the rank's whole share, ``1/t`` of
the tensor's elements, at the bytes the matmul reads: the compute precision (under FSDP's and ``replicate``'s mixed
precision the gathered weight already is; under autocast the executor casts the share before exchanging it). A
checkpoint that recomputes the projection exchanges again: its linear saves the exchanged weight for backward.

The shares are unequal: a rank keeps the stored rows it also computes with and sends the rest, so what leaves the
busiest rank (:func:`moved_fraction`) is priced, not the balanced all-to-all's ``(t−1)/t``: for Phi-3-medium's
``qkv_proj`` (parts 5120 + 1280 + 1280) a third of the share at ``t = 2``, all of it at ``t = 5`` and ``t = 10``.

The trace records a tensor-parallel group's styles, not each projection's input width, so the elements come from the
op graph: the projection's linear node and its input's last dim.

Example:
    >>> [(c.kind, c.nbytes, round(c.moved, 3)) for c in row_exchange_collectives((7680 * 5120,), tp=2, element_bytes=2,
    ...                                                                        sizes=(5120, 1280, 1280))]
    [('all_to_all', 39321600.0, 0.333)]
"""

from __future__ import annotations

from ..graph import Layer, ModelGraph
from ..vocabulary import fused_sizes
from .collectives import Collective

__all__ = ["exchanged_elements", "moved_fraction", "row_exchange_collectives"]

#: op graph (by identity) → {linear FQN: (output, input features)}; a few graphs at a time (the planner's, a test's)
_LINEARS: dict[int, tuple[object, dict[str, tuple[int, int]]]] = {}


def row_exchange_collectives(elements: tuple[int, ...], tp: int, element_bytes: int,
                             sizes: tuple[int, ...]) -> tuple[Collective, ...]:
    """One direction's all-to-alls (forward, or backward's inverse) of a projection of fused parts ``sizes`` exchanging
    tensors of ``elements`` elements each over ``tp`` ranks, ``element_bytes`` per element: one per tensor, each a
    send buffer of the rank's ``1/tp`` share, of which the busiest rank moves :func:`moved_fraction`.

    Example:
        >>> [(c.kind, c.nbytes, c.moved) for c in row_exchange_collectives((64 * 32, 64), 2, 4, (32, 16, 16))]
        [('all_to_all', 4096.0, 0.5), ('all_to_all', 128.0, 0.5)]
    """
    moved = moved_fraction(sizes, tp)
    return tuple(Collective("all_to_all", n / tp * element_bytes, 1, tp, "tp", moved) for n in elements)


def moved_fraction(sizes: tuple[int, ...], tp: int) -> float:
    """The largest fraction of its stored rows (rows r of t of the whole fused weight) that a rank sends away, which
    is also what it receives: its compute rows (rows r of t of every part) less those it stores.

    Example:
        >>> phi3_medium = (5120, 1280, 1280)
        >>> moved_fraction((32, 16, 16), 2), moved_fraction(phi3_medium, 2), moved_fraction(phi3_medium, 5)
        (0.5, 0.3333333333333333, 1.0)
    """
    share = sum(sizes) // tp
    starts = [sum(sizes[:p]) for p in range(len(sizes))]
    kept = [sum(max(0, min((r + 1) * share, start + (r + 1) * size // tp) - max(r * share, start + r * size // tp))
                for start, size in zip(starts, sizes)) for r in range(tp)]
    return (share - min(kept)) / share


def exchanged_elements(graph: ModelGraph, layer: Layer) -> dict[str, tuple[int, ...]]:
    """For each ``colwise:a+b+c`` projection in ``layer``'s tensor-parallel groups, the elements of the tensors the
    executor exchanges: its weight (output features × input features), then its bias if it has one. Empty for a
    layer without one (the common case, answered without reading the op graph).

    Example:
        >>> from autoplan.synthetic import gpt_like_graph
        >>> g = gpt_like_graph(layers=1)
        >>> exchanged_elements(g, g.layer("blocks.0"))
        {}
    """
    fused = {fqn: sum(fused_sizes(style)) for group in layer.tp_groups for fqn, style in group.styles.items()
             if fused_sizes(style) is not None}
    if not fused:
        return {}
    linears = _linears(graph)
    out = {}
    for fqn, out_features in fused.items():
        if linears.get(fqn, (0, 0))[0] != out_features:
            raise ValueError(f"the op graph of {graph.model_name} has no linear node of {fqn!r} with {out_features} "
                             f"output features: the all-to-alls of its colwise parts cannot be priced; trace the "
                             f"model again with autoplan.trace")
        bias = (out_features,) if f"{fqn}.bias" in layer.param_names else ()
        out[fqn] = (out_features * linears[fqn][1],) + bias
    return out


def _linears(graph: ModelGraph) -> dict[str, tuple[int, int]]:
    """{FQN: (output features, input features)} of the linear modules in ``graph``'s op graph (an ``fx``
    ``call_module`` node, or ``torch.export``'s ``linear``: its output's and its input's last dims), read once per
    op graph."""
    g = graph.nx_graph
    hit = _LINEARS.get(id(g))
    if hit is not None and hit[0] is g:
        return hit[1]
    linears: dict[str, tuple[int, int]] = {}
    for _, attrs in g.nodes(data=True):
        fqn, shape, args = attrs.get("module"), attrs.get("shape"), attrs.get("args") or ()
        if fqn in linears or not shape or not args or args[0] not in g:
            continue
        if attrs.get("op") == "call_module" or str(attrs.get("target")).split(".")[0] == "linear":
            source = g.nodes[args[0]].get("shape")
            if source:
                linears[fqn] = (shape[-1], source[-1])
    if len(_LINEARS) >= 8:
        _LINEARS.clear()
    _LINEARS[id(g)] = (g, linears)
    return linears
