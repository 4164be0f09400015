"""Ranks that share processors (several CPU ranks on few cores): how much slower than alone a rank computes under a
layout, :func:`compute_contention`. On a cluster with a device per rank (``compute_concurrency`` = 0) it is 1.

Example:
    >>> from dataclasses import replace
    >>> from autoplan import Cluster
    >>> compute_contention(replace(Cluster.preset("cpu"), compute_concurrency=2.0), pp=1, microbatches=1,
    ...                    schedule="1f1b")
    2.0
"""

from __future__ import annotations

from ..cluster import Cluster
from .._checks import check_positive_int as _check_positive_int
from .step import _check_schedule

__all__ = ["compute_contention", "stage_times_per_step"]


def stage_times_per_step(pp: int, microbatches: int, virtual_stages: int = 1) -> int:
    """Stage-times on a pipeline rank's critical path over a step: m·v of its own and pp − 1 of fill and drain
    (the bubble, :func:`autoplan.cost.plan_cost.compose`); what a fixed cost per stage and microbatch is paid
    over.

    Example:
        >>> stage_times_per_step(pp=4, microbatches=8), stage_times_per_step(pp=4, microbatches=8, virtual_stages=2)
        (11, 19)
    """
    return microbatches * virtual_stages + pp - 1


def compute_contention(cluster: Cluster, *, pp: int, microbatches: int, schedule: str,
                       virtual_stages: int = 1) -> float:
    """How much slower than alone a rank computes under a layout, when ranks share processors
    (``cluster.compute_concurrency`` = c > 0, e.g. four gloo ranks on two cores), averaged over the step's
    stage-times; 1 when every rank has its own device (c = 0).

    Processor sharing gives each of k runnable ranks min(1, c / k) of a processor, so a stage-time in which k
    ranks compute stretches by max(1, k / c). Without a pipeline every rank is busy all along: W / c (W = the
    world size). A pipeline's step is n = m·v + pp − 1 stage-times on a rank's critical path
    (:func:`stage_times_per_step`), and in stage-time j the pipeline stages busy are those the
    wave of microbatches has reached and not yet left, min(j + 1, pp, n − j, m·v), each with W / pp ranks (its
    data- and tensor-parallel peers): the contention is the mean of max(1, k_j / c) over the n stage-times. A
    pipeline's waiting ranks hand their processor to the busy ones, so its fill and drain cost less than on
    dedicated devices. The mean of the stretches, not the stretch of the mean busy count: with few
    microbatches the busy count hovers about c, and averaging it first hid the stage-times above it (pp4 with 2
    microbatches on 4 ranks and c = 1.7: 1.6 ranks busy on average, no stretch, where its 3 middle stage-times
    run 2 ranks at once and measured 15–38% slower than priced). ``autoplan.calibrate`` measures c (all ranks'
    rate over one rank's alone) and one rank's rates.

    Example:
        >>> from autoplan import Cluster
        >>> from dataclasses import replace
        >>> c = replace(Cluster.preset("cpu"), compute_concurrency=2.0)                # 4 ranks, 2 cores
        >>> compute_contention(c, pp=1, microbatches=4, schedule="1f1b")
        2.0
        >>> round(compute_contention(c, pp=4, microbatches=8, schedule="1f1b"), 3)  # 1,2,3,4,4,4,4,4,3,2,1 busy
        1.545
        >>> compute_contention(Cluster.preset("a100-80gb"), pp=4, microbatches=8, schedule="1f1b")
        1.0
    """
    _check_positive_int("microbatches", microbatches)
    concurrency = cluster.compute_concurrency
    if concurrency <= 0:
        return 1.0
    if pp == 1:
        return max(1.0, cluster.world_size / concurrency)
    _check_schedule(schedule, pp, virtual_stages)
    chunks = microbatches * virtual_stages
    slots = stage_times_per_step(pp, microbatches, virtual_stages)
    per_stage = cluster.world_size / pp
    return sum(max(1.0, per_stage * min(j + 1, pp, slots - j, chunks) / concurrency) for j in range(slots)) / slots
