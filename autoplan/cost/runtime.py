"""Fixed costs of the runtime a layout runs under, per step: the stage roots' data-parallel hooks, the pipeline
runtime's schedule actions and the step's loss collectives. The first two are measured by :mod:`autoplan.calibrate`
(0 on the presets); all three are per-step constants of a layout, the same on every pipeline rank, so they join the
rank's tail (:func:`autoplan.cost.plan_cost.rank_tail_s`), where the solver sees them in α.

Example:
    >>> from autoplan import Cluster
    >>> pipeline_runtime_s(Cluster.preset("a100-80gb"), pp=4, microbatches=8, schedule="1f1b")   # not measured
    0.0
"""

from __future__ import annotations

from ..cluster import Cluster
from ..cluster_tables import group_layer_overhead_s
from .collectives import Collective, group_allreduce_s, group_broadcast_s
from .contention import compute_contention, stage_times_per_step
from .step import fsdp_keeps_weights

__all__ = ["data_parallel_root_kind", "data_parallel_root_s", "pipeline_runtime_s", "loss_collectives",
           "loss_sync_s", "LOSS_BYTES"]

#: The step's loss as the executor reduces it: one fp32 scalar (the mean over microbatches, cast up under autocast).
LOSS_BYTES = 4


def loss_collectives(*, pp: int, dp: int) -> tuple[Collective, ...]:
    """What every rank issues once per step to report the step's loss (:meth:`autoplan.ParallelModel.train_step`):
    with a pipeline the last stage broadcasts its mean loss to the other pipeline ranks, then with data
    parallelism the replicas all-reduce it to the global mean. Tensor-parallel ranks hold the same loss already.

    Example:
        >>> [(c.kind, c.nbytes, c.group_size, c.axis) for c in loss_collectives(pp=2, dp=4)]
        [('broadcast', 4, 2, 'pp'), ('all_reduce', 4, 4, 'dp')]
        >>> loss_collectives(pp=1, dp=1)
        ()
    """
    out = [Collective("broadcast", LOSS_BYTES, 1, pp, "pp")] if pp > 1 else []
    out += [Collective("all_reduce", LOSS_BYTES, 1, dp, "dp")] if dp > 1 else []
    return tuple(out)


def loss_sync_s(cluster: Cluster, *, pp: int, dp: int, tp: int) -> float:
    """Seconds of :func:`loss_collectives`: latency-bound messages, priced on their groups' placement (the pipeline
    group's ranks dp·tp apart, the data-parallel group's tp apart), measured where calibrated.

    Example (one A100 node: the broadcast over pp = 2 ranks is one hop, the all-reduce over dp = 4 six ring steps):
        >>> round(loss_sync_s(Cluster.preset("a100-80gb"), pp=2, dp=4, tp=1) * 1e6)   # 5 µs + 6 × 5 µs
        35
    """
    return sum(group_broadcast_s(c.nbytes, cluster, c.group_size, dp * tp) if c.kind == "broadcast"
               else group_allreduce_s(c.nbytes, cluster, c.group_size, tp)
               for c in loss_collectives(pp=pp, dp=dp))


def data_parallel_root_kind(*, dp: int, data_parallel: str, tp: int, pp: int, microbatches: int,
                            reshard: str = "step") -> str | None:
    """The FSDP2 wrapper on each pipeline stage's root module (:mod:`autoplan.execute.data_parallel`), as a
    :data:`autoplan.cluster_tables.GROUP_OVERHEAD_KINDS` figure: ``fully_shard`` under FSDP ("fsdp", or
    "fsdp_keep" when :func:`fsdp_keeps_weights`), ``replicate`` under DDP composed with tensor or pipeline
    parallelism, none for classic DDP (its reducer's hooks are per gradient bucket, inside autograd) or dp = 1.

    Example:
        >>> [data_parallel_root_kind(dp=2, data_parallel=k, tp=1, pp=2, microbatches=4) for k in ("ddp", "fsdp")]
        ['replicate', 'fsdp_keep']
        >>> data_parallel_root_kind(dp=4, data_parallel="ddp", tp=1, pp=1, microbatches=4) is None
        True
    """
    if dp == 1:
        return None
    if data_parallel == "fsdp":
        return "fsdp_keep" if fsdp_keeps_weights(microbatches, pp, reshard) else "fsdp"
    return "replicate" if tp > 1 or pp > 1 else None


def data_parallel_root_s(cluster: Cluster, *, dp: int, data_parallel: str, tp: int, pp: int, microbatches: int,
                         schedule: str, virtual_stages: int = 1, reshard: str = "step") -> float:
    """Seconds a step spends in the hooks of the stage roots' data-parallel wrappers
    (:func:`data_parallel_root_kind`) on its critical path.

    FSDP2's ``fully_shard`` and ``replicate`` put one state on each stage's root module, whose pre- and
    post-forward and pre- and post-backward hooks run for every microbatch of every stage (torch's pipeline
    stages call the root once per microbatch), whatever layers the root holds; the layers that are FSDP units of
    their own pay their own hooks (:func:`autoplan.cost.layer_cost`). Each root costs the wrapper's measured
    figure f at the data-parallel group's size (``Device.group_layer_overhead``, per forward-equivalent: forward
    1×, backward 2×, as a layer's overhead) stretched by :func:`compute_contention`, c: 3·f·c per stage and
    microbatch. A pipeline rank runs v stages per microbatch, and the bubble is (pp − 1) stage-times
    (:func:`autoplan.cost.plan_cost.compose`), so a step pays (m·v + pp − 1)·3·f·c — the same for every rank,
    hence a per-step constant of the layout. 0 without a measured figure (the presets).

    Example (pp = 2, dp = 2 under DDP: ``replicate`` roots; 1 ms of hooks per forward, no sharing):
        >>> from dataclasses import replace
        >>> c = Cluster.preset("cpu")
        >>> c = replace(c, device=replace(c.device, group_layer_overhead={"replicate": {"2": 1e-3}}))
        >>> round(data_parallel_root_s(c, dp=2, data_parallel="ddp", tp=1, pp=2, microbatches=4,
        ...                            schedule="1f1b") * 1e3, 3)                    # (4 + 1) × 3 × 1 ms
        15.0
    """
    kind = data_parallel_root_kind(dp=dp, data_parallel=data_parallel, tp=tp, pp=pp, microbatches=microbatches,
                                   reshard=reshard)
    if kind is None:
        return 0.0
    per_forward_s = group_layer_overhead_s(cluster.device, kind, dp)
    if per_forward_s == 0:
        return 0.0
    contention = compute_contention(cluster, pp=pp, microbatches=microbatches, schedule=schedule,
                                    virtual_stages=virtual_stages)
    return stage_times_per_step(pp, microbatches, virtual_stages) * 3 * per_forward_s * contention


def pipeline_runtime_s(cluster: Cluster, *, pp: int, microbatches: int, schedule: str,
                       virtual_stages: int = 1) -> float:
    """Seconds a step spends in the pipeline runtime beyond its stages' layers and sends, with pp > 1.

    ``torch.distributed.pipelining`` runs each stage's forward and backward of each microbatch as schedule
    actions: it splits the batch into microbatches, posts the receives into buffers it allocates, validates
    shapes, calls the loss on the last stage and waits on the sends. Their fixed time per stage and microbatch,
    f (``Device.pipeline_stage_overhead_s``, one rank alone, measured by :mod:`autoplan.calibrate` on a
    2-stage pipeline of tiny blocks), is stretched by :func:`autoplan.cost.compute_contention`, c, and paid
    on every stage-time of the rank's critical path (:func:`stage_times_per_step`): (m·v + pp − 1)·f·c, a
    per-step constant of the layout. 0 without pipeline parallelism or without a measured figure (the presets).

    Example (1 ms per stage and microbatch, no sharing: 8 microbatches over 4 stages pay 11 stage-times):
        >>> from dataclasses import replace
        >>> c = Cluster.preset("cpu")
        >>> c = replace(c, device=replace(c.device, pipeline_stage_overhead_s=1e-3))
        >>> round(pipeline_runtime_s(c, pp=4, microbatches=8, schedule="1f1b") * 1e3, 3)
        11.0
        >>> pipeline_runtime_s(c, pp=1, microbatches=8, schedule="1f1b")
        0.0
    """
    per_stage_s = cluster.device.pipeline_stage_overhead_s
    if pp == 1 or per_stage_s == 0:
        return 0.0
    contention = compute_contention(cluster, pp=pp, microbatches=microbatches, schedule=schedule,
                                    virtual_stages=virtual_stages)
    return stage_times_per_step(pp, microbatches, virtual_stages) * per_stage_s * contention
