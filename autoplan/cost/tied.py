"""Weights tied across pipeline stages (a GPT's token embedding and its head): their gradient sync and the copies.

When the layers that share one tensor sit on different pipeline ranks, each rank holds a copy and the executor
(:func:`autoplan.execute.pipeline.sync_tied_gradients`) sums the copies' gradients once per step, after the
last microbatch and before the optimizer: one all-reduce per tied group over the pipeline ranks that hold it,
at each (dp, tp) coordinate. Its bytes are the tied tensor's gradient (fp32, ``GRAD_REDUCE_BYTES``) as this
rank holds it: divided by tp when the holding module is tensor-parallel (a vocabulary-parallel embedding or
head), and by dp under FSDP (each rank syncs its shard). Pipeline ranks are ``dp·tp`` devices apart, so the
group spans ``dp·tp`` times the pipeline distance from its first holder to its last: it is priced as a group of
its size spread evenly over that span (inter-node as soon as the span leaves a node).

The trace counts a tied tensor once, in the layer holding its first name (the embedding); every other pipeline
rank that holds one of its modules (the head) holds a copy of its own: weights, gradients and optimizer states,
synced by its data-parallel wrapper and stepped by its optimizer like the rest of that rank's parameters
(:func:`tied_copy_params`, the tied tensor's elements, ÷ tp when the module is vocabulary-parallel there).

Example (a GPT-like chain with the head tied to the embedding, embedding and head on two pipeline ranks):
    >>> import autoplan
    >>> from autoplan.plan import Mesh, ModelInfo
    >>> from autoplan.synthetic import gpt_like_graph
    >>> g = gpt_like_graph(layers=2, hidden=64, seq=16, heads=4, vocab=100)
    >>> g.tied_parameters, g.tied_numels = [("tok.weight", "head.weight")], [100 * 64]
    >>> names = [layer.name for layer in g.layers]
    >>> plan = autoplan.Plan(model=ModelInfo("GPT", g.fingerprint, g.num_params),
    ...     cluster=autoplan.Cluster.preset("a100-80gb"), global_batch_size=32, microbatch_size=4, microbatches=2,
    ...     mesh=Mesh(pp=2, dp=4), schedule="1f1b", data_parallel="ddp",
    ...     stages=(autoplan.Stage(tuple(names[:3])), autoplan.Stage(tuple(names[3:]))))
    >>> [[(c.kind, c.nbytes, c.count, c.group_size) for c in rank] for rank in tied_gradient_collectives(g, plan)]
    [[('all_reduce', 25600, 1, 2)], [('all_reduce', 25600, 1, 2)]]
    >>> first, last = tied_gradient_sync_s(g, plan, plan.cluster)
    >>> first == last > 0
    True
    >>> tied_copy_params(g, plan)       # the head's rank holds the embedding's 100 × 64 elements again
    (0, 6400)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from ..cluster import Cluster
from ..graph import ModelGraph
from ..names import owner_index
from ..plan import Mesh, Plan
from .collectives import Collective, group_allreduce_s
from .step import GRAD_REDUCE_BYTES

__all__ = ["tied_gradient_collectives", "tied_gradient_sync_s", "tied_sync_by_rank", "tied_copy_params",
           "tied_copies_by_rank"]


def _plan_holder(plan: Plan) -> Callable[[str], tuple[int, bool] | None]:
    """What a plan says of a tied weight's module: (the pipeline rank holding it, tensor-parallel sharded)."""
    stage_of = {layer: k for k, stage in enumerate(plan.stages) for layer in stage.layers}

    def holder(module: str) -> tuple[int, bool] | None:
        index = owner_index(module, plan.layers)
        if index is None:
            return None
        return stage_of[plan.layers[index]] % plan.mesh.pp, module in plan.tensor_parallel

    return holder


class _TiedGroup(NamedTuple):
    ranks: list[int]  # the pipeline ranks holding one of the group's modules, in order
    nbytes: int  # the gradient bytes each of them all-reduces
    copies: dict[int, int]  # pipeline rank → elements of the copy it holds without the layer that counts them


def _groups(graph: ModelGraph, mesh: Mesh, fsdp: bool,
            holder: Callable[[str], tuple[int, bool] | None]) -> list[_TiedGroup]:
    """Per tied group held on two pipeline ranks or more: the holding ranks, the gradient bytes a rank syncs and
    the copies. ``holder(module)``: the pipeline rank holding a tied weight's module and whether it is sharded
    there. A group's first name is the one the trace counts (``named_parameters`` yields each tensor once, under
    that name): the ranks holding only the others hold copies."""
    if mesh.pp == 1:
        return []
    out = []
    for names, numel in zip(graph.tied_parameters, graph.tied_numels):
        holders: dict[int, bool] = {}
        owners: set[int] = set()
        for k, name in enumerate(names):
            held = holder(name.rpartition(".")[0])
            if held is None:
                continue
            rank, sharded = held
            holders[rank] = holders.get(rank, False) or sharded
            if k == 0:
                owners.add(rank)
        if len(holders) < 2:
            continue
        tp_sharded = any(holders.values())
        shards = (mesh.tp if tp_sharded and mesh.tp > 1 else 1) * (mesh.dp if fsdp else 1)
        copies = {r: numel // (mesh.tp if sharded and mesh.tp > 1 else 1)
                  for r, sharded in holders.items() if owners and r not in owners}
        out.append(_TiedGroup(sorted(holders), numel * GRAD_REDUCE_BYTES // shards, copies))
    return out


def tied_gradient_collectives(graph: ModelGraph, plan: Plan) -> tuple[tuple[Collective, ...], ...]:
    """Per pipeline rank, the tied-weight gradient all-reduces one of its devices issues per step (see the
    module docstring)."""
    per_rank: list[list[Collective]] = [[] for _ in range(plan.mesh.pp)]
    for ranks, nbytes, _ in _groups(graph, plan.mesh, plan.data_parallel == "fsdp", _plan_holder(plan)):
        for r in ranks:
            per_rank[r].append(Collective("all_reduce", nbytes, 1, len(ranks), "pp"))
    return tuple(tuple(rank) for rank in per_rank)


def tied_gradient_sync_s(graph: ModelGraph, plan: Plan, cluster: Cluster) -> tuple[float, ...]:
    """Per pipeline rank, the seconds of its tied-weight gradient all-reduces per step.

    Example: a plan without a pipeline syncs nothing.
        >>> import autoplan
        >>> from autoplan.synthetic import gpt_like_graph
        >>> g, cluster = gpt_like_graph(layers=2), autoplan.Cluster.preset("a100-80gb")
        >>> tied_gradient_sync_s(g, autoplan.Plan.example(), cluster)
        (0.0,)
    """
    return tied_sync_by_rank(graph, cluster, plan.mesh, plan.data_parallel == "fsdp", _plan_holder(plan))


def tied_copy_params(graph: ModelGraph, plan: Plan) -> tuple[int, ...]:
    """Per pipeline rank, the elements of tied weights it holds as copies (see the module docstring): parameters
    of that rank that no layer's ``num_params`` counts.

    Example: a plan without a pipeline holds no copy.
        >>> import autoplan
        >>> from autoplan.synthetic import gpt_like_graph
        >>> tied_copy_params(gpt_like_graph(layers=2), autoplan.Plan.example())
        (0,)
    """
    return tied_copies_by_rank(graph, plan.mesh, _plan_holder(plan))


def tied_copies_by_rank(graph: ModelGraph, mesh: Mesh,
                        holder: Callable[[str], tuple[int, bool] | None]) -> tuple[int, ...]:
    """:func:`tied_copy_params` of a layout given as ``holder`` (see :func:`tied_sync_by_rank`).

    Example: the embedding on pipeline rank 0, the vocabulary-parallel head on rank 1, tp = 2.
        >>> from autoplan.synthetic import gpt_like_graph
        >>> g = gpt_like_graph(layers=2, hidden=64, seq=16, heads=4, vocab=100)
        >>> g.tied_parameters, g.tied_numels = [("tok.weight", "head.weight")], [100 * 64]
        >>> tied_copies_by_rank(g, Mesh(pp=2, tp=2), lambda m: (int(m == "head"), m == "head"))
        (0, 3200)
    """
    copies = [0] * mesh.pp
    for group in _groups(graph, mesh, False, holder):
        for r, numel in group.copies.items():
            copies[r] += numel
    return tuple(copies)


def tied_sync_by_rank(graph: ModelGraph, cluster: Cluster, mesh: Mesh, fsdp: bool,
                      holder: Callable[[str], tuple[int, bool] | None]) -> tuple[float, ...]:
    """:func:`tied_gradient_sync_s` of a layout given as ``holder(module)`` → (the pipeline rank holding that
    tied weight's module, whether it is tensor-parallel sharded there) or ``None``: what the search prices for
    a layout before it is a plan.

    Example: the embedding on pipeline rank 0 and the head on rank 1 of a 2-stage pipeline.
        >>> import autoplan
        >>> from autoplan.synthetic import gpt_like_graph
        >>> g = gpt_like_graph(layers=2, hidden=64, seq=16, heads=4, vocab=100)
        >>> g.tied_parameters, g.tied_numels = [("tok.weight", "head.weight")], [100 * 64]
        >>> cluster = autoplan.Cluster.preset("a100-80gb")
        >>> apart = tied_sync_by_rank(g, cluster, Mesh(pp=2, dp=4), False, lambda m: (int(m == "head"), False))
        >>> together = tied_sync_by_rank(g, cluster, Mesh(pp=2, dp=4), False, lambda m: (0, False))
        >>> apart[0] == apart[1] > 0, together
        (True, (0.0, 0.0))
    """
    seconds = [0.0] * mesh.pp
    step = mesh.dp * mesh.tp
    for ranks, nbytes, _ in _groups(graph, mesh, fsdp, holder):
        # the pipeline ranks tied are not evenly spaced over the world (0 and pp − 1): price them as a group
        # of their size spread over the ranks they span, so that it leaves a node exactly when they do
        stride = max(1, step * (ranks[-1] - ranks[0] + 1) // len(ranks))
        for r in ranks:
            seconds[r] += group_allreduce_s(nbytes, cluster, len(ranks), stride)
    return tuple(seconds)
