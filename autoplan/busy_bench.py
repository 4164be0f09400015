"""Measurements taken with every rank of the job busy at once, for :mod:`autoplan.calibrate`: makespans (from a
common barrier until the last rank is done: with ranks time-sharing processors a rank's own time over a few
milliseconds is often a window it ran uncontended), a wrapped block's forward + backward, the data-parallel
wrappers' gradient sync as it runs in a step, and the pipeline runtime's fixed time per stage. Every function
here is collective: every rank of the default group calls it.

Example (the pipeline runtime's figure from a measured 2-stage makespan; the measurements run under torchrun):
    >>> round(pipeline_stage_overhead_from_s(0.036, microbatches=8, stage_s=1e-3, sends_s=5e-4, contention=2.0), 5)
    0.00075
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from .cluster import Cluster
from .microbench import _sync, _tiny_block, block_step_time_s, interleaved_medians

__all__ = ["slowest", "group_of", "group_mesh", "makespan_s", "busy_step_s", "sync_in_step_s",
           "fsdp_collectives_in_step_s", "pipeline_stage_overhead_s", "pipeline_stage_overhead_from_s"]


def slowest(value: float, device: torch.device) -> float:
    """The largest of every rank's ``value``, on every rank.

    Example (under torchrun): ``slowest(time.perf_counter() - start, torch.device("cpu"))``
    """
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def group_of(ranks: list[list[int]], me: int) -> tuple[dist.ProcessGroup, list[int]]:
    """A process group for each list of ``ranks`` (every rank creates every group) and the one rank ``me`` is in,
    with its members.

    Example (under torchrun, 4 ranks): ``group, members = group_of([[0, 1], [2, 3]], dist.get_rank())``
    """
    groups = [dist.new_group(r) for r in ranks]  # new_group is collective: all ranks create every group
    return next((g, r) for g, r in zip(groups, ranks) if me in r)


def group_mesh(device: torch.device, n: int):
    """The 1-D device mesh of this rank's group when the world is cut into groups of ``n`` consecutive ranks, as
    the executor's meshes place an inner dimension (every rank creates every group).

    Example (under torchrun, 4 ranks): ``group_mesh(torch.device("cpu"), 2).get_group()``
    """
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    return init_device_mesh(device.type, (world // n, n), mesh_dim_names=("rest", "group"))["group"]


def makespan_s(fn: Callable[[], object], device: torch.device, busy: bool) -> float:
    """Seconds from a common barrier until the last rank has finished ``fn()`` (every rank when ``busy``, rank 0
    alone otherwise, the others waiting); the same value on every rank.

    Example (under torchrun): ``makespan_s(lambda: block(x).sum().backward(), torch.device("cpu"), busy=True)``
    """
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    if busy or dist.get_rank() == 0:
        fn()
        _sync(device)  # a GPU's kernels are asynchronous: the work is done when the device says so
    dist.barrier()
    return slowest(time.perf_counter() - start, device)


def busy_step_s(block: torch.nn.Module, x: torch.Tensor, device: torch.device,
                window_s: float) -> Callable[[], float]:
    """A measure of ``block``'s forward + backward on every rank at once: seconds per call of the makespan
    (:func:`makespan_s`) of as many calls as take about ``window_s``, the same count on every rank (the block may
    issue collectives). A rank's own time over a few calls is often a window it ran uncontended: measured so, a
    block without collectives once read faster with every rank busy than alone.

    Example (under torchrun): ``busy_step_s(block, x, torch.device("cpu"), window_s=0.05)()``
    """
    x = x.detach().requires_grad_(True)
    calls = max(3, round(window_s / slowest(block_step_time_s(block, x, iters=2, repeats=1), device)))

    def run() -> None:
        for _ in range(calls):
            block(x).sum().backward()

    return lambda: makespan_s(run, device, busy=True) / calls


_CHAIN_LINEARS = 4


def _chain_side(num_bytes: int) -> int:
    return max(2, int((num_bytes / 4 / _CHAIN_LINEARS) ** 0.5))


def _linear_chain(num_bytes: int, device: torch.device) -> torch.nn.Sequential:
    """``_CHAIN_LINEARS`` square fp32 linears (no bias) holding ``num_bytes`` together, the same weights on every
    rank."""
    side = _chain_side(num_bytes)
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(side, side, bias=False) for _ in range(_CHAIN_LINEARS)]).to(device)


def _step_medians(modules: dict[str, torch.nn.Module], num_bytes: int, device: torch.device,
                  rounds: int) -> dict[str, float]:
    """Each chain's (:func:`_linear_chain`) forward + backward makespan (:func:`makespan_s`, every rank busy) on a
    2-row input, the median of ``rounds`` interleaved samples, after one warm-up call each (DDP's first backward
    builds its buckets)."""
    x = torch.randn(2, _chain_side(num_bytes), device=device)
    for module in modules.values():
        module(x).sum().backward()
    medians, _ = interleaved_medians(
        {name: lambda m=m: makespan_s(lambda: m(x).sum().backward(), device, busy=True)
         for name, m in modules.items()}, rounds=rounds)
    return medians


def sync_in_step_s(wrapper: str, num_bytes: int, mesh, device: torch.device, rounds: int = 3) -> float:
    """Seconds a data-parallel wrapper's gradient synchronisation adds to a step for ``num_bytes`` of gradients
    over the group of ``mesh`` (:func:`group_mesh`; every group of its size at once, every rank busy): a chain of square
    linears holding that many bytes, run on a tiny input, under ``DistributedDataParallel`` ("ddp": its buckets,
    copies and all-reduces, against the chain plain) or FSDP2's ``replicate`` ("replicate", what DDP composed with
    TP or PP runs: with its gradient sync on, against off), each the makespan of a forward + backward
    (:func:`makespan_s`), the median of ``rounds`` interleaved samples. The all-reduce alone, measured with
    nothing else running, misses what the wrappers add: DDP on 4 ranks sharing 2 cores took 10.3, 16.3 and 43.2 ms
    for 1, 4 and 16 MiB against 7.9, 10.2 and 29.0 ms for back-to-back all-reduces.

    Example (under torchrun, 4 ranks): ``sync_in_step_s("ddp", 2**22, group_mesh(cpu, 4), cpu)``
    """
    if wrapper == "ddp":
        from .execute.data_parallel import distributed_data_parallel  # the executor's DDP, as it syncs

        plain = _linear_chain(num_bytes, device)
        synced = distributed_data_parallel(_linear_chain(num_bytes, device), mesh.get_group())
    else:
        from torch.distributed._composable.replicate_with_fsdp import replicate

        plain = replicate(_linear_chain(num_bytes, device), mesh=mesh)
        synced = replicate(_linear_chain(num_bytes, device), mesh=mesh)
        plain.set_requires_gradient_sync(False)
    medians = _step_medians({"plain": plain, "synced": synced}, num_bytes, device, rounds)
    return max(1e-9, medians["synced"] - medians["plain"])


def fsdp_collectives_in_step_s(unit_bytes: int, mesh, device: torch.device, rounds: int = 3) -> tuple[float, float]:
    """(all-gather, reduce-scatter) seconds of one FSDP2 unit's collective in a step, for a unit of ``unit_bytes``
    of weights, resp. gradients, over the group of ``mesh`` (every group of its size at once, every rank busy): a
    chain of 4 linears of ``unit_bytes`` each, each a ``fully_shard`` unit, run on a tiny input three ways —
    FSDP2's defaults (each unit gathers its weights in forward and again in backward, then reduce-scatters),
    keeping the gathered weights with the gradient reduction on (one reduce-scatter per unit), and with it off
    (no collective after the warm-up's gather). A reduce-scatter is the second less the third, over 4 units; an
    all-gather the first less the second, over 8. Timed so, the collectives cost what they cost between the
    units' compute and hooks on ranks that share processors: on 4 ranks sharing 2 cores, 8 all-gathers and 4
    reduce-scatters of 1 MiB units took 51.7 and 35.6 ms in a step, against 19.0 and 25.9 ms back to back with
    nothing else running.

    Example (under torchrun, 4 ranks): ``fsdp_collectives_in_step_s(2**20, group_mesh(cpu, 4), cpu)``
    """
    from torch.distributed.fsdp import fully_shard

    units = _CHAIN_LINEARS

    def chain(keep: bool, reduce: bool) -> torch.nn.Module:
        module = _linear_chain(units * unit_bytes, device)
        for layer in module:
            fully_shard(layer, mesh=mesh, reshard_after_forward=not keep)
        fully_shard(module, mesh=mesh, reshard_after_forward=not keep)
        if keep:
            module.set_requires_gradient_sync(reduce)
            module.set_reshard_after_backward(False)
        return module

    medians = _step_medians({"default": chain(False, True), "keep": chain(True, True), "local": chain(True, False)},
                            units * unit_bytes, device, rounds)
    return (max(1e-9, (medians["default"] - medians["keep"]) / (2 * units)),
            max(1e-9, (medians["keep"] - medians["local"]) / units))


def pipeline_stage_overhead_s(device: torch.device, plain_s: float, cluster: Cluster, rounds: int = 3,
                               microbatches: int = 8) -> tuple[float, dict[str, float]]:
    """(the pipeline runtime's fixed seconds per stage and microbatch, one rank alone; spreads): a 2-stage
    ``Schedule1F1B`` of one tiny block per stage over every pair of consecutive ranks at once, ``microbatches``
    of one sample each (the executor's runtime: ``torch.distributed.pipelining``), its makespan less what the
    cost model prices without the figure — (m + 1) stage-times of the block's forward + backward alone
    (3·``plain_s``) stretched by the pipeline's contention, and the first stage's sends — divided by those
    stage-times and the contention (:func:`pipeline_stage_overhead_from_s`). 0 with fewer than 2 ranks or an
    odd world.

    Example (under torchrun): ``pipeline_stage_overhead_s(torch.device("cpu"), 2e-4, calibrated_cluster)``
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from .cost import compute_contention
    from .cost.collectives import group_p2p_s

    world, me = dist.get_world_size(), dist.get_rank()
    if world < 2 or world % 2:
        return 0.0, {}
    group, _ = group_of([[r, r + 1] for r in range(0, world, 2)], me)
    block, x = _tiny_block(device)
    stage = PipelineStage(block, me % 2, 2, device, group=group)
    schedule = Schedule1F1B(stage, n_microbatches=microbatches, loss_fn=lambda out, target: out.sum())
    batch = x.repeat(microbatches, 1, 1)

    def step() -> None:
        if me % 2 == 0:
            schedule.step(batch)
        else:
            schedule.step(target=batch)

    step()  # warm-up: the stage's shape inference and buffers
    medians, spread = interleaved_medians({"pipeline": lambda: makespan_s(step, device, busy=True)},
                                          rounds=rounds)
    contention = compute_contention(cluster, pp=2, microbatches=microbatches, schedule="1f1b")
    sends_s = 2 * group_p2p_s(x.numel() * x.element_size(), cluster, 2, 1)
    return pipeline_stage_overhead_from_s(medians["pipeline"], microbatches, 3 * plain_s, sends_s,
                                          contention), spread


def pipeline_stage_overhead_from_s(makespan_s: float, microbatches: int, stage_s: float, sends_s: float,
                                   contention: float) -> float:
    """The pipeline runtime's fixed seconds per stage and microbatch, one rank alone, from a 2-stage pipeline's
    measured ``makespan_s``: the cost model prices such a step at (m + 1) stage-times of ``stage_s`` (a stage's
    forward + backward alone) × ``contention`` + ``sends_s`` (the first stage's, per microbatch) without the
    figure, and at (m + 1)·f·contention more with it (:func:`autoplan.cost.pipeline_runtime_s`); f makes the
    two equal, at least 0.

    Example (8 microbatches of 1 ms stages at contention 2, 0.5 ms of sends: 9 × 2.5 ms priced, 36 ms run):
        >>> round(pipeline_stage_overhead_from_s(0.036, 8, 1e-3, 5e-4, 2.0) * 1e3, 3)
        0.75
    """
    stage_times = microbatches + 1
    priced_s = stage_times * (stage_s * contention + sends_s)
    return max(0.0, (makespan_s - priced_s) / (stage_times * contention))
