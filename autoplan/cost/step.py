"""What a training step adds beyond its layers: pipeline schedule terms (microbatches in flight, bubble),
the data-parallel gradient synchronisation and the optimizer update.

Example:
    >>> from autoplan.cost.step import bubble_microbatches
    >>> bubble_microbatches("1f1b", pp=4)
    3
"""

from __future__ import annotations

from .._checks import check_positive_int as _check_positive_int
from .._checks import check_precision as _check_precision
from ..cluster import Cluster
from ..vocabulary import DATA_PARALLEL_KINDS, FSDP_RESHARD_MODES, PRECISION_BYTES, SCHEDULES
from .collectives import Collective
from .collectives import check_group as _check_group
from .collectives import MEASURED_SYNC_KINDS, collective_terms
from .memory import state_bytes_per_param

__all__ = ["GRAD_REDUCE_BYTES", "check_fsdp_reshard", "fsdp_keeps_weights",
           "fsdp_held_bytes_per_param", "data_parallel_collectives", "data_parallel_sync_s",
           "data_parallel_sync_terms", "optimizer_step_bytes_per_param",
           "optimizer_step_s", "optimizer_param_s",
           "in_flight_microbatches", "bubble_microbatches", "layer_step_overhead_s"]


# ---------------------------------------------------------------------------------------------------------------
# Data parallelism and the optimizer step
# ---------------------------------------------------------------------------------------------------------------


#: Bytes per element of gradient reductions. Mixed precision still reduces gradients in fp32: under autocast the
#: parameters, hence their gradients, are fp32; FSDP2 is given ``MixedPrecisionPolicy(reduce_dtype=float32)``;
#: Megatron-LM accumulates and all-reduces bf16 gradients in fp32 (``--accumulate-allreduce-grads-in-fp32``).
GRAD_REDUCE_BYTES = 4


def check_fsdp_reshard(reshard: str, pp: int) -> None:
    """``ValueError`` unless ``reshard`` is one of :data:`FSDP_RESHARD_MODES` and the layout can run it.

    Per-microbatch resharding needs pp = 1: torch.distributed.pipelining's stages turn resharding after backward
    and the gradient sync off before every microbatch's backward (``backward_maybe_with_nosync``) and reduce once
    after the last, so a pipelined FSDP stage keeps its gathered weights through the step whatever it is asked.

    Example:
        >>> check_fsdp_reshard("microbatch", pp=1)
        >>> try:
        ...     check_fsdp_reshard("microbatch", pp=2)
        ... except ValueError as e:
        ...     print(str(e)[:57])
        fsdp_reshard='microbatch' needs pp = 1, got pp = 2: torch
    """
    if reshard not in FSDP_RESHARD_MODES:
        raise ValueError(f"fsdp_reshard must be one of {FSDP_RESHARD_MODES}, got {reshard!r}")
    if reshard == "microbatch" and pp > 1:
        raise ValueError(
            f"fsdp_reshard='microbatch' needs pp = 1, got pp = {pp}: torch's pipeline stages keep FSDP's gathered "
            f"weights between microbatches (they turn resharding after backward off before each microbatch's "
            f"backward); use fsdp_reshard='step' or a layout without pipeline parallelism")


def fsdp_keeps_weights(microbatches: int, pp: int, reshard: str = "step") -> bool:
    """Whether FSDP keeps each unit's gathered weights from the step's first forward to its last backward: the
    one rule the executor applies (:mod:`autoplan.execute.apply`, :mod:`autoplan.execute.parallel_model`) and the
    cost model prices, a function of the plan's ``microbatches``, ``mesh.pp`` and ``fsdp_reshard``.

    ``reshard="step"`` (the default, and every plan written before the choice existed) with several microbatches
    or a pipeline: the executor passes ``reshard_after_forward=False`` to ``fully_shard`` (as torchtitan does
    under pipeline parallelism) and, between microbatches, neither reshards nor reduces
    (``set_reshard_after_backward`` / ``set_requires_gradient_sync``; torch's pipeline stages do the same): one
    all-gather and one reduce-scatter per unit and step. The price is memory: the stage's unsharded weights and
    gradient accumulators live through the step (:func:`fsdp_held_bytes_per_param`). ``reshard="microbatch"``
    (pp = 1, :func:`check_fsdp_reshard`), or one microbatch without a pipeline: FSDP reshards after every forward
    and backward (ZeRO-3): two all-gathers and one reduce-scatter per unit and microbatch, one unit's weights at
    a time.

    Example:
        >>> fsdp_keeps_weights(microbatches=1, pp=1), fsdp_keeps_weights(microbatches=4, pp=1)
        (False, True)
        >>> fsdp_keeps_weights(microbatches=4, pp=1, reshard="microbatch")
        False
    """
    _check_positive_int("microbatches", microbatches)
    _check_positive_int("pp", pp)
    check_fsdp_reshard(reshard, pp)
    return reshard == "step" and (microbatches > 1 or pp > 1)


def fsdp_held_bytes_per_param(precision: str, data_parallel: str, dp: int, microbatches: int, pp: int,
                              reshard: str = "step") -> int:
    """Bytes per parameter (after TP) that FSDP keeps unsharded through a step when :func:`fsdp_keeps_weights`:
    the gathered weights at the compute precision and the unsharded gradient accumulators, fp32
    (:data:`GRAD_REDUCE_BYTES`: FSDP2 accumulates unreduced gradients in ``reduce_dtype`` between microbatches,
    and a pipeline stage reduces only after its last backward). 0 for DDP, dp = 1 and resharding steps.

    Example:
        >>> fsdp_held_bytes_per_param("bf16", "fsdp", dp=8, microbatches=4, pp=1)   # bf16 weight + fp32 grad
        6
        >>> fsdp_held_bytes_per_param("bf16", "fsdp", dp=8, microbatches=4, pp=1, reshard="microbatch")
        0
    """
    _check_precision(precision)
    _check_positive_int("dp", dp)
    if data_parallel != "fsdp" or dp == 1 or not fsdp_keeps_weights(microbatches, pp, reshard):
        return 0
    return PRECISION_BYTES[precision] + GRAD_REDUCE_BYTES


def data_parallel_collectives(num_params: int, *, dp: int, data_parallel: str, precision: str,
                              microbatches: int = 1, pp: int = 1, reshard: str = "step",
                              grad_reduce_bytes: int = GRAD_REDUCE_BYTES) -> tuple[Collective, ...]:
    """The data-parallel collectives one device issues per step for ``num_params`` (after tensor parallelism,
    before FSDP sharding), as :class:`~autoplan.cost.collectives.Collective` records: what
    :func:`data_parallel_sync_s` prices and what the executor runs.

    DDP: one all-reduce of the gradients (``no_sync`` / no gradient sync before the last microbatch). FSDP: a
    reduce-scatter of the gradients and one all-gather of the weights per step when
    :func:`fsdp_keeps_weights`, else, per microbatch, two all-gathers (forward and backward) and a reduce-scatter
    (ZeRO-3; ``reshard="microbatch"`` with m microbatches: 2·m and m). Bytes are summed over FSDP units: per unit
    the counts are these.

    Example:
        >>> [(c.kind, c.nbytes, c.count) for c in data_parallel_collectives(
        ...     1000, dp=2, data_parallel="fsdp", precision="bf16", microbatches=4)]
        [('all_gather', 2000, 1), ('reduce_scatter', 4000, 1)]
        >>> [(c.kind, c.count) for c in data_parallel_collectives(
        ...     1000, dp=2, data_parallel="fsdp", precision="bf16", microbatches=4, reshard="microbatch")]
        [('all_gather', 8), ('reduce_scatter', 4)]
    """
    if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < 0:
        raise ValueError(f"num_params must be an int ≥ 0, got {num_params!r}")
    _check_positive_int("dp", dp)
    _check_positive_int("grad_reduce_bytes", grad_reduce_bytes)
    if data_parallel not in DATA_PARALLEL_KINDS:
        raise ValueError(f"unknown data_parallel {data_parallel!r}; use one of {DATA_PARALLEL_KINDS}")
    _check_precision(precision)
    if dp == 1:
        return ()
    grad_bytes = num_params * grad_reduce_bytes
    if data_parallel == "ddp":
        return (Collective("all_reduce", grad_bytes, 1, dp, "dp"),)
    if fsdp_keeps_weights(microbatches, pp, reshard):
        gathers, scatters = 1, 1
    else:  # every microbatch gathers for forward, again for backward, and reduce-scatters (ZeRO-3)
        gathers, scatters = 2 * microbatches, microbatches
    return (Collective("all_gather", num_params * PRECISION_BYTES[precision], gathers, dp, "dp"),
            Collective("reduce_scatter", grad_bytes, scatters, dp, "dp"))


def data_parallel_sync_s(num_params: int, cluster: Cluster, *, dp: int, stride: int, data_parallel: str,
                         precision: str, grad_reduce_bytes: int = GRAD_REDUCE_BYTES, microbatches: int = 1,
                         pp: int = 1, reshard: str = "step") -> float:
    """Gradient synchronisation of one device's ``num_params`` per step: DDP all-reduce of gradients; FSDP
    all-gathers of weights plus a reduce-scatter of gradients (ZeRO §7), counted by
    :func:`data_parallel_collectives` (two all-gathers and a reduce-scatter per microbatch when FSDP reshards,
    one each per step when it keeps its weights: :func:`fsdp_keeps_weights`).

    ``num_params`` is what the device's stage holds after tensor parallelism and before FSDP sharding; the
    data-parallel group is ``dp`` ranks ``stride`` (= tp) apart. Gradients travel at ``grad_reduce_bytes`` per
    element (fp32 by default, see :data:`GRAD_REDUCE_BYTES`; pass ``state_bytes_per_param(...).grads`` for
    ZeRO's bf16 accounting), gathered weights at the precision's element size. DDP: one (hierarchical)
    all-reduce of 2(n−1)/n·Ψ·g bytes; FSDP: 2 all-gathers of (n−1)/n·Ψ·p bytes and 1 reduce-scatter of
    (n−1)/n·Ψ·g bytes, 1.5× the DDP volume when p = g (ZeRO §7.2.2), two-level across nodes
    (:func:`group_allgather_s`). The caller decides how much of it overlaps compute.

    Example:
        >>> c = Cluster.preset("a100-80gb")               # 8 GPUs, 300 GB/s NVLink
        >>> round(data_parallel_sync_s(1_000_000_000, c, dp=8, stride=1, data_parallel="ddp",
        ...                            precision="bf16"), 4)        # 2·7/8·4 GB / 300 GB/s + 14·5 µs
        0.0234
    """
    if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < 0:
        raise ValueError(f"num_params must be an int ≥ 0, got {num_params!r}")
    latency_s, seconds_per_param = data_parallel_sync_terms(cluster, dp=dp, stride=stride,
                                                            data_parallel=data_parallel, precision=precision,
                                                            grad_reduce_bytes=grad_reduce_bytes,
                                                            microbatches=microbatches, pp=pp, reshard=reshard)
    return latency_s + num_params * seconds_per_param


def data_parallel_sync_terms(cluster: Cluster, *, dp: int, stride: int, data_parallel: str, precision: str,
                             grad_reduce_bytes: int = GRAD_REDUCE_BYTES, microbatches: int = 1,
                             pp: int = 1, reshard: str = "step") -> tuple[float, float]:
    """(latency_s, seconds_per_param) of :func:`data_parallel_sync_s`, which is affine in the parameters.

    Each collective of :func:`data_parallel_collectives` is priced by
    :func:`autoplan.cost.collective_terms`: measured per kind and group size when the cluster was calibrated,
    else the ring formulas, where an all-reduce is two all-gathers' time and a reduce-scatter one. DDP:
    AR(g·Ψ); FSDP: k·AG(p·Ψ) + j·RS(g·Ψ) with k = 2·m, j = m (m microbatches resharding each, one without a
    pipeline), or k = j = 1 when :func:`fsdp_keeps_weights`. DDP reads the calibrated line of its wrapper where
    there is one — "ddp_all_reduce" for ``DistributedDataParallel`` (``stride`` = ``pp`` = 1),
    "replicate_all_reduce" for FSDP2's ``replicate`` (DDP composed with TP or PP): the sync as it runs in a step,
    buckets and copies included (:data:`autoplan.cost.collectives.MEASURED_SYNC_KINDS`). FSDP's bytes read the
    slope of "fsdp_all_gather" and "fsdp_reduce_scatter" where calibrated (its collectives between its units'
    compute and hooks), their latency the plain collective's.

    Example:
        >>> c = Cluster.preset("a100-80gb")
        >>> latency_s, per_param = data_parallel_sync_terms(c, dp=8, stride=1, data_parallel="ddp",
        ...                                                 precision="bf16")
        >>> round(latency_s * 1e6), round(per_param * 1e9 * 1e3, 2)     # 14 steps of 5 µs; ms per 1e9 params
        (70, 23.33)
    """
    _check_positive_int("dp", dp)
    _check_positive_int("grad_reduce_bytes", grad_reduce_bytes)
    if data_parallel not in DATA_PARALLEL_KINDS:
        raise ValueError(f"unknown data_parallel {data_parallel!r}; use one of {DATA_PARALLEL_KINDS}")
    _check_precision(precision)
    _check_group(cluster, dp, stride)
    if dp == 1:
        return 0.0, 0.0
    # One parameter's collectives, each kind at its own (latency, seconds per byte).
    records = data_parallel_collectives(1, dp=dp, data_parallel=data_parallel, precision=precision,
                                        microbatches=microbatches, pp=pp, reshard=reshard,
                                        grad_reduce_bytes=grad_reduce_bytes)
    # DDP's all-reduce at its measured cost in a step where calibrated: DistributedDataParallel itself without tp
    # or pp, FSDP2's replicate with them (autoplan.execute.data_parallel)
    sync_kind = ("ddp_all_reduce" if stride == 1 and pp == 1 else "replicate_all_reduce") \
        if data_parallel == "ddp" else None
    terms = [(c, collective_terms(cluster, sync_kind or c.kind, dp, stride)) for c in records]
    if data_parallel == "fsdp":
        # FSDP's bytes at their measured cost between its units' compute; the step's latency stays the plain
        # collective's (each unit's own in-step latency, the line's intercept, is layer_step_overhead_s's)
        terms = [(c, (latency_s, collective_terms(cluster, f"fsdp_{c.kind}", dp, stride)[1]
                      if f"fsdp_{c.kind}" in MEASURED_SYNC_KINDS else per_byte))
                 for c, (latency_s, per_byte) in terms]
    return (sum(c.count * latency_s for c, (latency_s, _) in terms),
            sum(c.count * c.nbytes * per_byte for c, (_, per_byte) in terms))


def optimizer_step_bytes_per_param(precision: str, optimizer: str) -> int:
    """Bytes read + written per parameter by one fused optimizer update.

    AdamW (Loshchilov & Hutter 2019, Algorithm 2; torch.optim.AdamW(fused=True) touches each element once):
    fp32 reads w, g, m, v (16) and writes w, m, v (12) = 28; mixed precision reads the fp32 master, m, v and a
    bf16 gradient (14) and writes master, m, v and the bf16 working copy (14) = 28 (autocast and FSDP2 mixed
    precision update fp32 weights from fp32 gradients: the fp32 count, also 28). SGD with momentum: fp32
    reads w, g, buf (12), writes w, buf (8) = 20; mixed reads master, buf, g (10), writes master, buf, bf16
    copy (10) = 20.

    Example:
        >>> optimizer_step_bytes_per_param("bf16", "adamw")
        28
    """
    b = state_bytes_per_param(precision, optimizer)
    if precision == "fp32":
        # read weights, grads, states; write weights, states
        return b.params + b.grads + b.optimizer + b.params + b.optimizer
    # read fp32 master + states (b.optimizer), low-precision grads; write master + states and the working copy
    return b.optimizer + b.grads + b.optimizer + b.params


def optimizer_step_s(num_params: int, cluster: Cluster, precision: str, optimizer: str) -> float:
    """The optimizer update of ``num_params`` on one device, one rank alone: ``num_params`` ×
    :func:`optimizer_param_s`.

    Example:
        >>> c = Cluster.preset("h100-80gb")               # 3.35 TB/s HBM3
        >>> round(optimizer_step_s(1_000_000_000, c, "bf16", "adamw") * 1e3, 2)   # 28 GB / 3.35 TB/s
        8.36
    """
    if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < 0:
        raise ValueError(f"num_params must be an int ≥ 0, got {num_params!r}")
    return num_params * optimizer_param_s(cluster, precision, optimizer)


def optimizer_param_s(cluster: Cluster, precision: str, optimizer: str) -> float:
    """Seconds per parameter of the optimizer update, memory-bandwidth bound: an elementwise update does ~1 FLOP
    per byte, far below any GPU's FLOP/byte ridge point (roofline, Williams et al. 2009).

    On a calibrated device, the update as torch runs it there (``device.optimizer_param_s``: the default
    ``torch.optim.AdamW``, whose passes and temporaries move far more than a fused kernel's bytes — 147 bytes
    per parameter on this project's CPU machine against 28), scaled by the optimizer's fused bytes against
    AdamW's (the states are fp32 under every precision the executor runs); otherwise the fused kernel's
    :func:`optimizer_step_bytes_per_param` over the memory bandwidth.

    Example:
        >>> from dataclasses import replace
        >>> c = Cluster.preset("h100-80gb")
        >>> round(optimizer_param_s(c, "bf16", "adamw") * 1e12, 2)          # 28 B / 3.35 TB/s, in ps
        8.36
        >>> measured = replace(c, device=replace(c.device, optimizer_param_s=2e-11))
        >>> round(optimizer_param_s(measured, "bf16", "sgd") * 1e12, 2)     # 20 B of AdamW's 28
        14.29
    """
    measured_s = cluster.device.optimizer_param_s
    if measured_s > 0:
        return measured_s * (optimizer_step_bytes_per_param("fp32", optimizer)
                             / optimizer_step_bytes_per_param("fp32", "adamw"))
    return optimizer_step_bytes_per_param(precision, optimizer) / cluster.device.memory_bandwidth_Bps


# ---------------------------------------------------------------------------------------------------------------
# Pipeline schedules
# ---------------------------------------------------------------------------------------------------------------


def _check_schedule(schedule: str, pp: int, virtual_stages: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
    _check_positive_int("pp", pp)
    _check_positive_int("virtual_stages", virtual_stages)
    if schedule != "interleaved" and virtual_stages != 1:
        raise ValueError(f"schedule {schedule!r} has one stage per rank; virtual_stages must be 1, "
                         f"got {virtual_stages} (use schedule='interleaved')")


def in_flight_microbatches(schedule: str, stage: int, pp: int, microbatches: int, virtual_stages: int = 1) -> int:
    """Microbatches whose activations a pipeline rank holds at its peak (GPipe: all; 1F1B: pp − stage,
    Narayanan et al. SC'21 §2.2).

    The unit is one microbatch through one of the rank's chunks: with ``virtual_stages`` = v chunks per rank
    a chunk holds 1/v of the rank's layers, so memory = this × Σ activation_bytes of the rank's layers / v
    (v = 1: the rank's whole layers). GPipe (Huang et al. 2019) runs every forward first: ``microbatches``.
    1F1B (PipeDream-Flush, SC'21 §2.2.1): rank s warms up with pp − s forwards, min(pp − s, m). Interleaved
    1F1B (SC'21 §2.2.2): rank s runs w = 2(pp − 1 − s) + (v − 1)·pp warm-up chunk forwards (Megatron-LM
    ``forward_backward_pipelining_with_interleaving``; torch ``ScheduleInterleaved1F1B`` warmup_ops), so
    min(w + 1, m·v) chunk activations are alive. On rank 0 that is (pp + (pp − 1)/v) whole-rank
    microbatches, Korthikanti et al. 2022 §4.2.3's factor (1 + (pp − 1)/(pp·v)) on pp microbatches.
    An "interleaved" schedule with v = 1 is plain 1F1B.

    Example:
        >>> in_flight_microbatches("1f1b", stage=0, pp=4, microbatches=8)
        4
        >>> in_flight_microbatches("interleaved", stage=0, pp=4, microbatches=8, virtual_stages=2)   # chunks
        11
    """
    _check_schedule(schedule, pp, virtual_stages)
    _check_positive_int("microbatches", microbatches)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < pp:
        raise ValueError(f"stage must be an int in [0, pp={pp}), got {stage!r}")
    if schedule == "gpipe":
        return microbatches
    if schedule == "1f1b" or virtual_stages == 1:
        return min(pp - stage, microbatches)
    warmup_chunks = 2 * (pp - 1 - stage) + (virtual_stages - 1) * pp
    return min(warmup_chunks + 1, microbatches * virtual_stages)


def bubble_microbatches(schedule: str, pp: int, virtual_stages: int = 1) -> float:
    """Idle time of a pipeline in units of one stage's per-microbatch time: (pp − 1) / virtual_stages
    (GPipe, 1F1B: Huang et al. 2019; interleaved: Narayanan et al. SC'21 §2.2.2).

    Step time of the pipeline = (microbatches + this) × the slowest rank's forward + backward per microbatch.

    Example:
        >>> bubble_microbatches("1f1b", pp=8), bubble_microbatches("interleaved", pp=8, virtual_stages=4)
        (7, 1.75)
    """
    _check_schedule(schedule, pp, virtual_stages)
    if schedule == "interleaved":
        return (pp - 1) / virtual_stages
    return pp - 1


# ---------------------------------------------------------------------------------------------------------------
# Per-step fixed costs
# ---------------------------------------------------------------------------------------------------------------


def layer_step_overhead_s(cluster: Cluster, *, param_tensors: int, dtensor: bool, fsdp_unit: bool, dp: int,
                          stride: int, precision: str, microbatches: int, pp: int, contention: float = 1.0,
                          reshard: str = "step") -> float:
    """A layer's fixed seconds per step outside its microbatches, as the rank spends them, divided by the step's
    ``microbatches`` (the caller charges it once per microbatch, :func:`autoplan.cost.layer_cost`'s
    ``per_step_s``, which adds it as it is):

    - the optimizer step and ``zero_grad`` launch per parameter tensor whatever its size:
      ``param_tensors`` × ``device.optimizer_tensor_overhead_s``, or the DTensor figure when the parameters are
      DTensors (FSDP2, ``replicate``, tensor parallelism), whose every op dispatches through DTensor; this is
      the rank's own compute, stretched by ``contention`` (the caller passes every rank's being busy: all
      ranks step at once, after a pipeline has drained);
    - an FSDP unit of its own issues its own all-gathers and reduce-scatter per step
      (:func:`data_parallel_collectives`' counts per unit): each pays the latency of one FSDP unit's
      collective (:func:`autoplan.cost.fsdp_unit_collective_s` of 0 bytes: the intercept of its line measured
      in a step, else the smallest message measured, else the ring formula's α). The data-parallel sync of the
      step prices their bytes, once for all units. Collectives are measured with every rank taking part, so their time is
      not stretched (multiplying it by the contention, as this did before, charged dp4 FSDP's latencies about
      three times on the 2-core machine: +37 … +42% in the benchmark runs that used one microbatch).

    Both are 0 on a device without calibrated figures and without FSDP.

    Example:
        >>> from autoplan import Cluster
        >>> from dataclasses import replace
        >>> c = Cluster.preset("cpu")
        >>> c = replace(c, device=replace(c.device, optimizer_tensor_overhead_s=1e-4))
        >>> round(layer_step_overhead_s(c, param_tensors=12, dtensor=False, fsdp_unit=False, dp=4, stride=1,
        ...                             precision="fp32", microbatches=4, pp=1) * 1e6)      # 12 × 100 µs / 4
        300
        >>> round(layer_step_overhead_s(c, param_tensors=12, dtensor=False, fsdp_unit=False, dp=4, stride=1,
        ...                             precision="fp32", microbatches=4, pp=1, contention=2.0) * 1e6)
        600
    """
    _check_positive_int("microbatches", microbatches)
    if not contention >= 1:
        raise ValueError(f"contention must be ≥ 1 (how much slower than alone a rank computes), got {contention}")
    device = cluster.device
    per_tensor_s = device.dtensor_optimizer_tensor_overhead_s if dtensor else device.optimizer_tensor_overhead_s
    total_s = contention * param_tensors * per_tensor_s
    if fsdp_unit and dp > 1:
        from .collectives import fsdp_unit_collective_s

        records = data_parallel_collectives(1, dp=dp, data_parallel="fsdp", precision=precision,
                                            microbatches=microbatches, pp=pp, reshard=reshard)
        total_s += sum(c.count * fsdp_unit_collective_s(cluster, c.kind, 0, dp, stride) for c in records)
    return total_s / microbatches
