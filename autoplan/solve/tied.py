"""Weights tied across pipeline ranks (a GPT's embedding and head) as the search prices them: the per-step
all-reduce of :mod:`autoplan.cost.tied` under a layout the search compares (its greedy layouts, CP-SAT's
objective), through the function ``plan.predicted`` uses, :func:`autoplan.cost.tied.tied_sync_by_rank`.

Example:
    >>> from autoplan.synthetic import gpt_like_graph
    >>> g = gpt_like_graph(layers=1)
    >>> g.tied_parameters = [("tok.weight", "head.weight")]
    >>> tied_modules(g)                 # the head's vocabulary-parallel style names its module
    [{'tok': (0, True), 'head': (4, True)}]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

from ..cost.tied import tied_copies_by_rank, tied_sync_by_rank
from ..graph import ModelGraph
from ..names import owner_index
from ..plan import Mesh

if TYPE_CHECKING:  # pragma: no cover
    from .tables import Assignment, StrategyTables

__all__ = ["tied_layer_groups", "tied_modules", "tied_costs", "tied_sync_terms", "TiedTerm"]


def tied_layer_groups(graph: ModelGraph) -> list[list[int]]:
    """Indices of the layers that own each group of tied parameters (``graph.tied_parameters``).

    Example:
        >>> from autoplan.synthetic import gpt_like_graph
        >>> g = gpt_like_graph(layers=1)
        >>> g.tied_parameters = [("tok.weight", "head.weight")]
        >>> tied_layer_groups(g)
        [[0, 4]]
    """
    names = [layer.name for layer in graph.layers]
    groups = []
    for tied in graph.tied_parameters:
        owners = sorted({o for o in (owner_index(fqn, names) for fqn in tied) if o is not None})
        if len(owners) > 1:
            groups.append(owners)
    return groups


def tied_modules(graph: ModelGraph) -> list[dict[str, tuple[int, bool]]]:
    """Per tied group, each name's module → (the index of the layer owning it, whether one of that layer's
    tensor-parallel groups names the module, so that sharding the layer shards it)."""
    names = [layer.name for layer in graph.layers]
    out: list[dict[str, tuple[int, bool]]] = []
    for tied in graph.tied_parameters:
        owned = {}
        for fqn in tied:
            module = fqn.rpartition(".")[0]
            i = owner_index(module, names)
            if i is not None:
                owned[module] = (i, any(module in g.styles for g in graph.layers[i].tp_groups))
        out.append(owned)
    return out


def _holder(tables: "StrategyTables", holders: dict[int, tuple[int, bool]],
            group: int | None) -> Callable[[str], tuple[int, bool] | None]:
    """The ``holder`` of :mod:`autoplan.cost.tied` for ``holders[layer] = (stage, tensor-parallel on)`` (only group
    ``group`` when given)."""
    s = tables.strategy
    modules = {m: v for k, owned in enumerate(tables.cache.tied_modules) if group in (None, k)
               for m, v in owned.items()}

    def holder(module: str) -> tuple[int, bool] | None:
        owner = modules.get(module)
        if owner is None or owner[0] not in holders:
            return None
        stage, tp_on = holders[owner[0]]
        return stage % s.pp, tp_on and owner[1] and s.tp > 1

    return holder


def _sync(tables: "StrategyTables", holders: dict[int, tuple[int, bool]],
          group: int | None = None) -> tuple[float, ...]:
    """:func:`autoplan.cost.tied.tied_sync_by_rank` with ``holders[layer] = (stage, tensor-parallel on)``."""
    s = tables.strategy
    return tied_sync_by_rank(tables.graph, tables.cluster, Mesh(s.pp, s.dp, s.tp), s.data_parallel == "fsdp",
                             _holder(tables, holders, group))


def _copies(tables: "StrategyTables", holders: dict[int, tuple[int, bool]],
            group: int | None = None) -> tuple[int, ...]:
    """:func:`autoplan.cost.tied.tied_copies_by_rank` with ``holders[layer] = (stage, tensor-parallel on)``."""
    s = tables.strategy
    return tied_copies_by_rank(tables.graph, Mesh(s.pp, s.dp, s.tp), _holder(tables, holders, group))


def _assignment_holders(tables: "StrategyTables", assignment: "Assignment") -> dict[int, tuple[int, bool]]:
    owners = {i for owned in tables.cache.tied_modules for i, _ in owned.values()}
    return {i: (k, choice.tp_on) for k, stage in enumerate(assignment) for i, choice in stage if i in owners}


def tied_costs(tables: "StrategyTables", assignment: "Assignment") -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Per pipeline rank, under ``assignment``: the all-reduce of weights tied across pipeline ranks, and the
    elements of the copies of them it holds (:mod:`autoplan.cost.tied`); both empty when there is none (one
    pipeline rank, no tied weight).

    Example: embedding and head tied, on the two ranks of a 2-stage pipeline: both sync, the head's rank holds a copy.
        >>> from autoplan.solve.tables import example_tables
        >>> t = example_tables(mesh={"pp": 2, "tp": 1}, microbatch_size=1)
        >>> t.cache.tied_modules = [{"tok": (0, True), "head": (7, True)}]
        >>> t.graph.tied_parameters, t.graph.tied_numels = [("tok.weight", "head.weight")], [1000 * 256]
        >>> (first, last), copies = tied_costs(t, [[(i, t.choices[t.segment_of[i]][0].choice) for i in range(a, b)]
        ...                                        for a, b in ((0, 4), (4, 8))])
        >>> first == last > 0, copies
        (True, (0, 256000))
    """
    if tables.strategy.pp == 1 or not tables.cache.tied_modules:
        return (), ()
    holders = _assignment_holders(tables, assignment)
    return _sync(tables, holders), _copies(tables, holders)


class TiedTerm(NamedTuple):
    """One tied group as the CP-SAT model prices it (:func:`tied_sync_terms`)."""

    decider: int | None  # the segment whose tensor-parallel choice decides whether it is sharded; None: fixed
    off_s: tuple[float, ...]  # per rank, the gradient sync's seconds, unsharded
    on_s: tuple[float, ...]  # sharded
    off_copy: tuple[int, ...]  # per rank, the elements of the copy it holds (autoplan.cost.tied), unsharded
    on_copy: tuple[int, ...]  # sharded


def tied_sync_terms(tables: "StrategyTables") -> list[TiedTerm]:
    """The tied weights as the CP-SAT model prices them: per tied group whose owning layers are the chain's first or
    last (so on pipeline rank 0 and the last stage's rank whatever the cuts), a :class:`TiedTerm`: per rank, the
    gradient sync's seconds and the copy's elements (whose model states, data-parallel sync and optimizer step the
    rank pays like its own parameters'), unsharded and sharded. A group owned by an inner layer (its rank follows
    the cuts) is not listed: the model counts 0 for it, a lower bound, while
    :meth:`autoplan.solve.tables.StrategyTables.evaluate` prices it exactly.

    Example: no tied weight, nothing to price.
        >>> from autoplan.solve.tables import example_tables
        >>> tied_sync_terms(example_tables(mesh={"pp": 2, "tp": 1}, microbatch_size=1))
        []
    """
    s = tables.strategy
    if s.pp == 1:
        return []
    last_layer, terms = tables.num_layers - 1, []
    for k, owned in enumerate(tables.cache.tied_modules):
        layers = {i for i, _ in owned.values()}
        if len(layers) < 2 or not layers <= {0, last_layer}:
            continue
        stage = {0: 0, last_layer: s.num_stages - 1}
        unsharded = {i: (stage[i], False) for i in layers}
        sharded = {i: (stage[i], True) for i in layers}
        off = (_sync(tables, unsharded, k), _copies(tables, unsharded, k))
        on = (_sync(tables, sharded, k), _copies(tables, sharded, k))
        decider = None
        if off != on:
            first = tables.segment_of[min(layers)]
            flags = {c.choice.tp_on for c in tables.choices[first]}
            if flags == {True}:
                off = on
            elif flags == {True, False}:
                decider = first  # a singleton segment (the chain's first layer), agreeing with its tied peers
        terms.append(TiedTerm(decider, off[0], on[0], off[1], on[1]))
    return terms
