"""Timed micro-benchmarks of one device and of its collectives: the measurements :mod:`autoplan.calibrate`
composes into a cluster's figures. Each returns seconds or a rate; none changes global state.

Example:
    >>> matmul_flops("fp32", n=32, iters=1) > 0
    True
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

from .vocabulary import torch_dtype

__all__ = ["matmul_flops", "matmul_efficiency", "memory_bandwidth_Bps", "layer_overhead_time_s", "block_step_time_s",
           "recompute_overhead_time_s", "optimizer_tensor_time_s", "optimizer_param_time_s", "allreduce_time_s",
           "collective_time_s", "ring_bandwidth_Bps",
           "overlap_fraction", "monotone", "interleaved_medians", "relative_spread", "MATMUL_SIZES",
           "COLLECTIVE_SIZES_BYTES"]

#: Message sizes of the collective table (bytes): latency-bound to bandwidth-bound, up to ``--size-mb``.
COLLECTIVE_SIZES_BYTES = (4096, 65536, 2**19)
#: Matmul sizes n of the efficiency table (n×n @ n×n), up to ``--matmul-n``.
MATMUL_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_call_s(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Median seconds of single ``fn()`` calls after one warm-up: a loaded machine delays some calls by far more
    than the call costs, and the median ignores them."""
    fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timed(fn: Callable[[], object], device: torch.device, min_s: float = 0.02, max_iters: int = 50) -> float:
    """Seconds of one ``fn()``: after a warm-up call, repeat it until ``min_s`` have passed (at most
    ``max_iters`` times) and return the mean."""
    fn()
    _sync(device)
    iters, start = 0, time.perf_counter()
    while True:
        fn()
        iters += 1
        if iters >= max_iters or time.perf_counter() - start >= min_s:
            break
    _sync(device)
    return (time.perf_counter() - start) / iters


def matmul_flops(precision: str, n: int = 1024, iters: int = 10, device: torch.device | None = None) -> float:
    """FLOP/s of an ``n×n`` matmul at ``precision`` on ``device`` (2n³ FLOPs each, after one warm-up).

    Example:
        >>> matmul_flops("bf16", n=32, iters=1) > 0
        True
    """
    device = device or torch.device("cpu")
    a = torch.randn(n, n, device=device, dtype=torch_dtype(precision))
    b = torch.randn(n, n, device=device, dtype=torch_dtype(precision))
    return 2 * n**3 / _timed(lambda: a @ b, device, min_s=0, max_iters=iters)


def matmul_efficiency(precision: str, max_n: int, device: torch.device | None = None,
                      budget_s: float = 0.5) -> tuple[float, list[tuple[float, float]]]:
    """(best FLOP/s, [(FLOPs per matmul, fraction of best)]) over square matmuls n ≤ ``max_n`` of
    :data:`MATMUL_SIZES`, smallest first, stopping once one size takes more than ``budget_s``.

    Example:
        >>> best, table = matmul_efficiency("fp32", max_n=64, budget_s=10)
        >>> [f for f, _ in table], max(e for _, e in table)
        ([8192.0, 65536.0, 524288.0], 1.0)
    """
    device = device or torch.device("cpu")
    rates = []
    for n in [m for m in MATMUL_SIZES if m <= max_n] or [max_n]:
        a = torch.randn(n, n, device=device, dtype=torch_dtype(precision))
        b = torch.randn(n, n, device=device, dtype=torch_dtype(precision))
        start = time.perf_counter()
        rates.append((2.0 * n**3, 2 * n**3 / _timed(lambda: a @ b, device, min_s=0.01, max_iters=20)))
        if time.perf_counter() - start > budget_s:
            break
    best = max(r for _, r in rates)
    return best, [(f, r / best) for f, r in rates]


def _tiny_block(device: torch.device):
    from .models import Block, GPTConfig

    torch.manual_seed(0)
    return Block(GPTConfig(hidden=16, heads=4, seq_len=4)).to(device), torch.randn(1, 4, 16, device=device)


def block_step_time_s(block: torch.nn.Module, x: torch.Tensor, iters: int = 20, repeats: int = 5) -> float:
    """Median seconds of one forward + backward of ``block`` on ``x`` (``repeats`` runs of ``iters``).

    Example:
        >>> import torch
        >>> 0 < block_step_time_s(torch.nn.Linear(4, 4), torch.randn(2, 4), iters=2, repeats=1) < 0.1
        True
    """
    x = x.detach().requires_grad_(True)
    block(x).sum().backward()  # warm-up: first-call allocations, dispatch and hook caches
    _sync(x.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            block(x).sum().backward()
        _sync(x.device)
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def optimizer_tensor_time_s(block: torch.nn.Module, iters: int = 10) -> float:
    """Seconds per parameter tensor of one ``torch.optim.AdamW`` step + ``zero_grad`` over ``block``'s
    parameters (the median call); for a tiny block this is the fixed per-tensor part. The gradients are zeros
    made in place of a backward, so that a block of DTensor parameters (FSDP2) is timed without a collective:
    one rank can measure it while the others wait.

    Example:
        >>> import torch
        >>> 0 < optimizer_tensor_time_s(torch.nn.Linear(4, 4), iters=2) < 0.1
        True
    """
    params = [p for p in block.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-6)

    def step():
        opt.step()
        opt.zero_grad(set_to_none=False)

    return _median_call_s(step, params[0].device, iters) / len(params)


def optimizer_param_time_s(per_tensor_s: float, device: torch.device | None = None, tensors: int = 32,
                           tensor_params: int = 2**16, iters: int = 5) -> float:
    """Seconds per parameter of one ``torch.optim.AdamW`` step (its default implementation on ``device``) over
    ``tensors`` fp32 tensors of ``tensor_params`` each (the median call), less ``per_tensor_s`` per tensor (the
    fixed part, :func:`optimizer_tensor_time_s`): the update as torch runs it here, whose passes and
    temporaries move far more bytes than a fused kernel's 28 per parameter (about 150 on this project's CPU
    machine). Tensors of 256 KiB, the size of a small model's matrices: one tensor of 2²¹ parameters costs
    1.5× more per parameter (its temporaries fault in fresh pages), 2¹⁰-parameter tensors are launch-bound.

    Example:
        >>> 0 < optimizer_param_time_s(0.0, tensors=2, tensor_params=4096, iters=2) < 1e-5
        True
    """
    params = [torch.nn.Parameter(torch.zeros(tensor_params, device=device or torch.device("cpu")))
              for _ in range(tensors)]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-6)
    step_s = _median_call_s(opt.step, params[0].device, iters)
    return max(0.0, step_s - tensors * per_tensor_s) / (tensors * tensor_params)


def layer_overhead_time_s(device: torch.device | None = None, iters: int = 20, repeats: int = 5) -> float:
    """Fixed forward seconds of one layer per microbatch on ``device``: a third of a tiny GPT block's forward +
    backward (forward 1×, backward 2×; its FLOPs are negligible).

    Example:
        >>> 0 < layer_overhead_time_s(iters=2, repeats=1) < 0.1
        True
    """
    block, x = _tiny_block(device or torch.device("cpu"))
    return block_step_time_s(block, x, iters, repeats) / 3


def recompute_overhead_time_s(device: torch.device | None = None, iters: int = 20, repeats: int = 5) -> float:
    """Fixed seconds the executor's recompute (:func:`autoplan.execute.recompute.apply_recompute`, non-reentrant
    ``torch.utils.checkpoint``) adds to a layer per microbatch beyond running its forward again: a tiny GPT block's
    forward + backward recomputed and plain, interleaved (their medians), less one forward's fixed time (a third of
    the plain block's, which :func:`autoplan.cost.layer_cost` already charges a recompute), at least 0. On this
    block's 24 saved tensors the saved-tensor hooks dominate: 0.9–2.1 ms against 0.2–0.5 ms for its forward here.

    Example:
        >>> 0 <= recompute_overhead_time_s(iters=2, repeats=1) < 0.1
        True
    """
    from .execute.recompute import apply_recompute  # loads the executor package only when this is measured

    block, x = _tiny_block(device or torch.device("cpu"))
    recomputed = torch.nn.Sequential(copy.deepcopy(block))
    apply_recompute(recomputed, ["0"])
    plain, again = [], []
    for _ in range(repeats):
        plain.append(block_step_time_s(block, x, iters, 1))
        again.append(block_step_time_s(recomputed, x, iters, 1))
    plain_s, again_s = statistics.median(plain), statistics.median(again)
    return max(0.0, again_s - plain_s - plain_s / 3)


def memory_bandwidth_Bps(device: torch.device | None = None, num_bytes: int = 2**27, iters: int = 5) -> float:
    """Bytes per second a copy of ``num_bytes`` moves through ``device`` memory: it reads and writes each byte,
    2·num_bytes per copy (the STREAM "copy" kernel's accounting, McCalpin 1995). The cost model prices
    elementwise ops at this rate (``autoplan.cost.memory_bound_s``).

    Example:
        >>> memory_bandwidth_Bps(num_bytes=2**20, iters=2) > 0  # bytes per second: ~1e10 on a quiet CPU
        True
    """
    device = device or torch.device("cpu")
    src = torch.ones(max(1, num_bytes // 4), device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _timed(lambda: dst.copy_(src), device, min_s=0, max_iters=iters)


def collective_time_s(kind: str, num_bytes: int, group: dist.ProcessGroup | None, device: torch.device,
                      iters: int = 7) -> float:
    """Median seconds of one ``kind`` collective of ``num_bytes`` over ``group`` (after one warm-up); collective.
    ``num_bytes`` is an all-reduce's buffer, an all-gather's result, a reduce-scatter's input, a broadcast's payload
    (from the group's first rank); for ``"send"`` the group's first rank sends ``num_bytes`` to its second.

    Example (under torchrun): ``collective_time_s("all_gather", 2**20, None, torch.device("cpu"))``
    """
    n = dist.get_world_size(group)
    elements = max(n, num_bytes // 4) // n * n
    full = torch.zeros(elements, device=device)
    part = torch.zeros(elements // n, device=device)
    if kind == "all_reduce":
        def op(): dist.all_reduce(full, group=group)
    elif kind == "all_gather":
        def op(): dist.all_gather_into_tensor(full, part, group=group)
    elif kind == "reduce_scatter":
        def op(): dist.reduce_scatter_tensor(part, full, group=group)
    elif kind == "broadcast":
        def op(): dist.broadcast(full, group_src=0, group=group)
    elif kind == "send":
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(n))
        me = dist.get_rank()
        def op():
            if me == ranks[0]:
                dist.send(full, ranks[1])
            elif me == ranks[1]:
                dist.recv(full, ranks[0])
    else:
        raise ValueError(f"unknown collective kind {kind!r}; use all_reduce, all_gather, reduce_scatter, broadcast "
                         f"or send")
    op()  # warm-up: connections and buffers
    times = []
    for _ in range(iters):  # the median of single operations: a loaded machine delays some of them by far more
        dist.barrier(group=group)
        start = time.perf_counter()
        op()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def allreduce_time_s(num_bytes: int, group: dist.ProcessGroup | None, device: torch.device, iters: int = 5) -> float:
    """Mean seconds of one all-reduce of ``num_bytes`` over ``group`` (after one warm-up); collective.

    Example (under torchrun): ``allreduce_time_s(2**24, None, torch.device("cpu"))``
    """
    return collective_time_s("all_reduce", num_bytes, group, device, iters)


def ring_bandwidth_Bps(num_bytes: int, ranks: int, time_s: float, latency_s: float) -> float:
    """Per-rank bandwidth from a timed ring all-reduce: 2(n−1)/n·bytes / (time − latency).

    Example:
        >>> ring_bandwidth_Bps(10**9, ranks=2, time_s=1.01, latency_s=0.01)
        1000000000.0
    """
    return 2 * (ranks - 1) / ranks * num_bytes / max(time_s - latency_s, 1e-9)


def overlap_fraction(comm_s: float, compute_s: float, both_s: float) -> float:
    """How much of the shorter of a collective and a computation hid behind the other when run together:
    (comm + compute − both) / min(comm, compute), clamped to [0, 1]; 1 is full overlap, 0 none.

    Example:
        >>> overlap_fraction(0.1, 0.1, 0.1), overlap_fraction(0.1, 0.1, 0.2)
        (1.0, 0.0)
    """
    shorter = min(comm_s, compute_s)
    return min(1.0, max(0.0, (comm_s + compute_s - both_s) / shorter)) if shorter > 0 else 0.0


def monotone(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators): a larger message never
    takes less time, so a noisy dip is averaged with the point above it.

    Example:
        >>> monotone([1.0, 3.0, 2.0, 4.0])
        [1.0, 2.5, 2.5, 4.0]
    """
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, c1), (m2, c2) = blocks.pop(-2), blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return [m for m, c in blocks for _ in range(int(c))]


def relative_spread(values: list[float]) -> float:
    """How far repeated timings of one thing disagree: the median absolute deviation over the median (0: all
    equal). Robust to one outlier among three or more, which a load spike makes.

    Example:
        >>> round(relative_spread([1.0, 1.1, 0.9]), 3), relative_spread([1.0, 1.0, 5.0])
        (0.1, 0.0)
    """
    mid = statistics.median(values)
    return statistics.median(abs(v - mid) for v in values) / mid if mid > 0 else 0.0


def interleaved_medians(measures: dict[str, Callable[[], float]], rounds: int = 3, extra_rounds: int = 2,
                        tolerance: float = 0.15) -> tuple[dict[str, float], dict[str, float]]:
    """Each of ``measures`` (name → a call returning seconds or a rate) taken ``rounds`` times, one of each in
    turn per round, so that a burst of load from other jobs slows one sample of every figure rather than every
    sample of one; then up to ``extra_rounds`` more rounds while any figure's :func:`relative_spread` exceeds
    ``tolerance``. Returns (name → median, name → relative spread). Collective when the calls are: every rank
    decides on the same values when each call returns the slowest rank's figure.

    Example (one figure disturbed once by a spike; the other spread until a fourth round):
        >>> spike, noisy = iter([1.0, 9.0, 1.0, 1.0]), iter([1.0, 2.0, 1.5, 1.5])
        >>> medians, spreads = interleaved_medians({"a": lambda: next(spike), "b": lambda: next(noisy)},
        ...                                        rounds=3, extra_rounds=2, tolerance=0.2)
        >>> medians, {k: round(v, 3) for k, v in spreads.items()}
        ({'a': 1.0, 'b': 1.5}, {'a': 0.0, 'b': 0.167})
    """
    if rounds < 1 or extra_rounds < 0:
        raise ValueError(f"rounds must be ≥ 1 and extra_rounds ≥ 0, got {rounds} and {extra_rounds}")
    samples: dict[str, list[float]] = {name: [] for name in measures}
    for round_ in range(rounds + extra_rounds):
        if round_ >= rounds and all(relative_spread(v) <= tolerance for v in samples.values()):
            break
        for name, fn in measures.items():
            samples[name].append(fn())
    return ({name: statistics.median(v) for name, v in samples.items()},
            {name: relative_spread(v) for name, v in samples.items()})
