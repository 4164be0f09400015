"""The alpha-beta (latency-bandwidth) times of one collective on one link: the formulas the group-level prices in
:mod:`autoplan.cost.collectives` fall back on where nothing was measured.

Ring algorithms after Thakur, Rabenseifner & Gropp, "Optimization of Collective Communication Operations in MPICH"
(IJHPCA 2005), §4; the same step counts give NCCL's "bus bandwidth" factors (NCCL tests, doc/PERFORMANCE.md:
all-reduce 2(n−1)/n, all-gather and reduce-scatter (n−1)/n, broadcast 1). ``bandwidth_Bps`` is one direction of
one rank's link.

Example:
    >>> round(allreduce_s(1e9, 8, bandwidth_Bps=100e9, latency_s=0.0), 4)   # 2·7/8·1 GB / 100 GB/s
    0.0175
"""

from __future__ import annotations

from .._checks import check_link as _check_link
from .._checks import check_non_negative as _check_non_negative
from .._checks import check_positive_int as _check_positive_int

__all__ = ["allreduce_s", "allgather_s", "reduce_scatter_s", "p2p_s", "alltoall_s", "broadcast_s"]


def allreduce_s(nbytes: float, n: int, *, bandwidth_Bps: float, latency_s: float) -> float:
    """Ring all-reduce: 2(n−1) steps of nbytes/n (Thakur et al. 2005; NCCL performance docs).

    Time = 2(n−1)/n · nbytes / bandwidth + 2(n−1) · latency; 0 for n == 1.

    Example:
        >>> round(allreduce_s(1e9, 8, bandwidth_Bps=100e9, latency_s=1e-6) * 1e3, 3)   # 17.5 ms + 14 µs
        17.514
    """
    # A ring all-reduce is a reduce-scatter followed by an all-gather (Thakur et al. 2005, §4.4).
    return 2 * allgather_s(nbytes, n, bandwidth_Bps=bandwidth_Bps, latency_s=latency_s)


def allgather_s(nbytes: float, n: int, *, bandwidth_Bps: float, latency_s: float) -> float:
    """Ring all-gather of a result of ``nbytes`` in total: (n−1) steps of nbytes/n.

    Time = (n−1)/n · nbytes / bandwidth + (n−1) · latency; 0 for n == 1.

    Example:
        >>> round(allgather_s(1e9, 4, bandwidth_Bps=100e9, latency_s=0.0), 4)   # 3/4 GB / 100 GB/s
        0.0075
    """
    _check_positive_int("n", n)
    _check_non_negative("nbytes", nbytes)
    _check_link(bandwidth_Bps, latency_s)
    if n == 1:
        return 0.0
    return (n - 1) / n * nbytes / bandwidth_Bps + (n - 1) * latency_s


def reduce_scatter_s(nbytes: float, n: int, *, bandwidth_Bps: float, latency_s: float) -> float:
    """Ring reduce-scatter of an input of ``nbytes``: (n−1) steps of nbytes/n.

    Time = (n−1)/n · nbytes / bandwidth + (n−1) · latency; 0 for n == 1 (the mirror of all-gather).

    Example:
        >>> round(reduce_scatter_s(1e9, 4, bandwidth_Bps=100e9, latency_s=0.0), 4)
        0.0075
    """
    return allgather_s(nbytes, n, bandwidth_Bps=bandwidth_Bps, latency_s=latency_s)


def p2p_s(nbytes: float, *, bandwidth_Bps: float, latency_s: float) -> float:
    """One point-to-point send: latency + nbytes / bandwidth.

    Example:
        >>> round(p2p_s(50e6, bandwidth_Bps=25e9, latency_s=10e-6) * 1e3, 3)   # 2 ms + 10 µs
        2.01
    """
    _check_non_negative("nbytes", nbytes)
    _check_link(bandwidth_Bps, latency_s)
    return latency_s + nbytes / bandwidth_Bps


def alltoall_s(nbytes: float, n: int, *, bandwidth_Bps: float, latency_s: float) -> float:
    """All-to-all of a send buffer of ``nbytes`` per rank, a 1/n share for each of the n ranks (its own included),
    by pairwise exchange: (n−1) steps, in each of which a rank sends one share to one other rank and receives one.

    Time = (n−1)/n · nbytes / bandwidth + (n−1) · latency; 0 for n == 1: the pairwise-exchange algorithm of Thakur,
    Rabenseifner & Gropp 2005 (§4, all-to-all, long messages), and NCCL's all-to-all bus bandwidth factor (n−1)/n
    (NCCL tests, doc/PERFORMANCE.md). The same as a ring all-gather of that buffer: each rank moves what is not its
    own, (n−1)/n of it, through its link.

    Example:
        >>> round(alltoall_s(1e9, 4, bandwidth_Bps=100e9, latency_s=0.0), 4)   # 3/4 GB / 100 GB/s
        0.0075
    """
    return allgather_s(nbytes, n, bandwidth_Bps=bandwidth_Bps, latency_s=latency_s)


def broadcast_s(nbytes: float, n: int, *, bandwidth_Bps: float, latency_s: float) -> float:
    """Pipelined chain (ring) broadcast of ``nbytes`` from one rank to the n − 1 others: the message crosses n − 1
    hops, and in pieces the last rank receives it nbytes / bandwidth after the first (NCCL's broadcast, bus
    bandwidth factor 1, doc/PERFORMANCE.md).

    Time = nbytes / bandwidth + (n−1) · latency; 0 for n == 1.

    Example:
        >>> round(broadcast_s(4, 4, bandwidth_Bps=100e9, latency_s=5e-6) * 1e6, 1)   # a loss scalar: 3 hops
        15.0
    """
    # the ring all-gather's n−1 hops, each rank's link carrying the whole payload: an all-gather of n/(n−1) of it
    scale = n / (n - 1) if n > 1 else 1.0
    return allgather_s(nbytes * scale, n, bandwidth_Bps=bandwidth_Bps, latency_s=latency_s)
