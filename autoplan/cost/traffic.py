"""The collectives a plan issues per training step, per pipeline rank: the records the step time is priced from.

Tensor-parallel collectives come from :func:`autoplan.cost.layer_cost` (``LayerCost.tp_collectives``, one
microbatch, recompute included), data-parallel ones from :func:`autoplan.cost.data_parallel_collectives`, and
pipeline sends are each stage's output forward and its input's gradient back, once per microbatch; the loss is
broadcast over the pipeline and all-reduced over the replicas once per step (:func:`autoplan.cost.loss_collectives`).
The executor's collective counts are compared with these in ``tests/test_collective_counts.py``.

Example:
    >>> from autoplan.synthetic import gpt_like_graph
    >>> import autoplan
    >>> from autoplan.options import PlanOptions
    >>> from autoplan.solve import search
    >>> graph = gpt_like_graph(layers=2, hidden=256, seq=128, vocab=1000)
    >>> plan = search(graph, autoplan.Cluster.preset("a100-80gb"), PlanOptions(global_batch_size=8,
    ...               mesh={"dp": 8}, data_parallel="ddp"))
    >>> [(c.kind, c.count, c.nbytes) for c in plan_collectives(graph, plan)[0]]   # the gradients, the loss
    [('all_reduce', 1, 7475200), ('all_reduce', 1, 4)]
"""

from __future__ import annotations

from dataclasses import replace

from ..graph import ModelGraph
from ..plan import Plan
from .collectives import Collective
from .layer_choice import layer_choice_cost, plan_layer_choices
from .strategy import Strategy
from .runtime import loss_collectives
from .sequence import norm_gradient_collectives
from .step import data_parallel_collectives
from .tied import tied_copy_params, tied_gradient_collectives

__all__ = ["plan_collectives"]


def plan_collectives(graph: ModelGraph, plan: Plan) -> tuple[tuple[Collective, ...], ...]:
    """Per pipeline rank, the collectives one of its devices issues in one step (counts are per step; FSDP's
    are per unit, see :func:`autoplan.cost.data_parallel_collectives`)."""
    strategy = Strategy.of(plan)
    m = strategy.microbatches
    stages = [[layer_choice_cost(graph, layer, plan.cluster, strategy, tp_on, option)
               for layer, tp_on, option in rows] for rows in plan_layer_choices(graph, plan)]
    last = len(stages) - 1
    per_rank: list[list[Collective]] = [[] for _ in range(strategy.pp)]
    params = list(tied_copy_params(graph, plan))  # copies of tied weights: synced like the rank's own parameters
    for k, costs in enumerate(stages):
        out = per_rank[k % strategy.pp]
        for c in costs:
            params[k % strategy.pp] += c.num_params
            out += [replace(t, count=t.count * m) for t in c.tp_collectives]
        if k < last:  # the stage's output, forward, and a sequence-parallel run cut there gathered and split
            out.append(Collective("send", costs[-1].boundary_bytes, m, 2, "pp"))
            out += [Collective(t.kind, t.nbytes, t.count * m, t.group_size, t.axis) for t in costs[-1].cut_collectives]
        if k > 0:  # the gradient of the stage's input, back
            out.append(Collective("send", stages[k - 1][-1].boundary_bytes, m, 2, "pp"))
    if strategy.sequence_parallel:  # once per step: the norm weights' partial gradients (autoplan.cost.sequence)
        for k, rows in enumerate(plan_layer_choices(graph, plan)):
            per_rank[k % strategy.pp] += norm_gradient_collectives([layer for layer, tp_on, _ in rows if tp_on],
                                                                   strategy.tp)
    if plan.expert_parallel > 1:  # the experts' dispatch per microbatch; their weights leave the dp collectives
        from .experts import expert_params, expert_parallel_collectives

        per_rank[0] += [Collective(t.kind, t.nbytes, t.count * m, t.group_size, t.axis)
                        for got in expert_parallel_collectives(graph, plan).values() for t in got]
        params[0] -= expert_params(graph)
    for r in range(strategy.pp):
        per_rank[r] += data_parallel_collectives(params[r], dp=strategy.dp, data_parallel=strategy.data_parallel,
                                                 precision=strategy.precision, microbatches=m, pp=strategy.pp,
                                                 reshard=strategy.fsdp_reshard)
    for r, tied in enumerate(tied_gradient_collectives(graph, plan)):  # once per step (autoplan.cost.tied)
        per_rank[r] += tied
    for r in range(strategy.pp):  # the step's loss, reported on every rank (autoplan.cost.loss_collectives)
        per_rank[r] += loss_collectives(pp=strategy.pp, dp=strategy.dp)
    return tuple(tuple(rank) for rank in per_rank)
