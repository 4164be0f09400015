"""What a plan says about the tensor parallelism it could not apply: a degree that shards nothing (and why), the
layers FSDP keeps whole, and the candidate groups the trace-time soundness check (:mod:`autoplan.trace.tp_check`)
dropped.

Example:
    >>> import torch, autoplan
    >>> from autoplan.trace.tp_notes import tensor_parallel_notes
    >>> g = autoplan.trace(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.randn(2, 4))
    >>> tensor_parallel_notes(g, 1, {})
    ()
"""

from __future__ import annotations

from ..graph import fsdp_blocks_tensor_parallel

__all__ = ["tensor_parallel_notes"]


def tensor_parallel_notes(graph, tp: int, sharded: dict[str, str], fsdp: bool = False) -> tuple[str, ...]:
    """What a plan with tensor-parallel degree ``tp`` should say about the groups it could not shard: nothing
    sharded at all (and why), the layers FSDP keeps whole (``fsdp``: the plan shards data-parallel replicas with
    FSDP, :func:`autoplan.graph.fsdp_blocks_tensor_parallel`), or the candidate groups that tracing found unsound.

    Example:
        >>> import torch, autoplan
        >>> g = autoplan.trace(torch.nn.Sequential(torch.nn.Linear(4, 4)), torch.randn(2, 4))
        >>> tensor_parallel_notes(g, 2, {})[0][:58]
        'tp=2 shards no module, so the 2 tp ranks repeat each other'
    """
    if tp <= 1:
        return ()
    notes = []
    divides = [layer for layer in graph.layers if layer.tp_divisor and layer.tp_divisor % tp == 0]
    blocked = [layer.name for layer in divides if fsdp and fsdp_blocks_tensor_parallel(layer)]
    if not sharded:
        if blocked and len(blocked) == len(divides):
            why = (f"every layer tp could shard ({blocked[0]}{' …' if len(blocked) > 1 else ''}) holds a fused "
                   f"projection with a bias (colwise:K), and FSDP has no dim left to shard that bias on; plan "
                   f"with data_parallel='ddp' to shard them")
        elif divides:
            why = (f"the layers whose groups tp divides share a tied weight ({graph.tied_parameters}) with a layer "
                   f"that cannot be sharded, and one tensor takes one placement")
        elif any(layer.tp_groups for layer in graph.layers):
            why = "no layer holds a tensor-parallel group whose heads/features tp divides"
        else:
            why = ("tracing found no tensor-parallel group (colwise → rowwise nn.Linear pair, vocabulary embedding "
                   "or head) in the model")
        notes.append(f"tp={tp} shards no module, so the {tp} tp ranks repeat each other's work: {why}; "
                     f"pin tp=1 or leave tp to the search")
    elif blocked:
        notes.append(f"not sharded under FSDP: {blocked[0]}{f' and {len(blocked) - 1} more' if len(blocked) > 1 else ''}"
                     f": a fused projection with a bias (colwise:K) leaves FSDP no dim to shard; plan with "
                     f"data_parallel='ddp' to shard them")
    reasons: dict[str, list[str]] = {}
    for styles, reason in graph.tp_dropped:
        reasons.setdefault(reason, []).append("+".join(sorted(styles)))
    for reason, groups in reasons.items():
        more = f" and {len(groups) - 1} more like it" if len(groups) > 1 else ""
        notes.append(f"not sharded: {groups[0]}{more}: {reason}")
    return tuple(notes)
