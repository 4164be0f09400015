"""Collectives per group placement: measured inside a node where :mod:`autoplan.calibrate` timed them, else the
alpha-beta formulas of :mod:`autoplan.cost.alpha_beta`, flat and across nodes.

Example:
    >>> from autoplan.cost.collectives import allreduce_s
    >>> round(allreduce_s(1e9, 8, bandwidth_Bps=100e9, latency_s=0.0), 4)   # 2·7/8·1 GB / 100 GB/s
    0.0175
"""

from __future__ import annotations

from dataclasses import dataclass

from .._checks import check_non_negative as _check_non_negative
from .._checks import check_positive_int as _check_positive_int
from ..cluster import Cluster
from .alpha_beta import allgather_s, allreduce_s, alltoall_s, broadcast_s, p2p_s, reduce_scatter_s

#: What the cost model charges and what ``tests/comm_counter.py`` counts on the wire, one spelling for both.
COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "send", "all_to_all", "broadcast")
#: What a wrapper's whole gradient synchronisation costs in a step, measured as it runs (``Cluster.collective_times``
#: only; not a collective the executor issues by that name): "ddp_all_reduce" is DDP's bucketed all-reduce with its
#: copies, "replicate_all_reduce" FSDP2 ``replicate``'s (DDP composed with TP or PP), "fsdp_all_gather" and
#: "fsdp_reduce_scatter" FSDP2's per-unit gathers and scatters between its units' compute, every rank busy
#: (:mod:`autoplan.calibrate`). Each is priced as the collective of :data:`MEASURED_SYNC_BASE` where it was not
#: measured.
MEASURED_SYNC_KINDS = ("ddp_all_reduce", "replicate_all_reduce", "fsdp_all_gather", "fsdp_reduce_scatter")
MEASURED_SYNC_BASE = {"ddp_all_reduce": "all_reduce", "replicate_all_reduce": "all_reduce",
                      "fsdp_all_gather": "all_gather", "fsdp_reduce_scatter": "reduce_scatter"}


@dataclass(frozen=True)
class Collective:
    """``count`` collectives of one ``kind`` per step on one device, each of ``nbytes`` (an all-gather's
    result, a reduce-scatter's input, an all-reduce's buffer, a send's or a broadcast's payload, an all-to-all's send
    buffer), over
    ``group_size`` ranks of the mesh axis ``axis``.

    The time functions below price exactly these records, so the count and bytes a plan is charged for can be
    compared with what the executor issues. ``moved`` is, for an all-to-all whose shares are unequal, the fraction
    of ``nbytes`` the busiest rank sends to (and receives from) other ranks; ``None``: a balanced collective's.

    Example:
        >>> Collective("all_gather", 1024, count=2, group_size=4).total_bytes
        2048
    """

    kind: str
    nbytes: float
    count: int = 1
    group_size: int = 2
    axis: str = ""  # the mesh axis of the group: "tp", "dp" or "pp"
    moved: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in COLLECTIVE_KINDS:
            raise ValueError(f"unknown collective kind {self.kind!r}; use one of {COLLECTIVE_KINDS}")

    @property
    def total_bytes(self) -> float:
        return self.nbytes * self.count

__all__ = [
    "Collective",
    "COLLECTIVE_KINDS",
    "MEASURED_SYNC_KINDS",
    "MEASURED_SYNC_BASE",
    "allreduce_s",
    "allgather_s",
    "reduce_scatter_s",
    "p2p_s",
    "alltoall_s",
    "broadcast_s",
    "group_link",
    "group_allreduce_s",
    "group_allgather_s",
    "group_allgather_terms",
    "group_reduce_scatter_s",
    "group_p2p_s",
    "group_alltoall_s",
    "group_broadcast_s",
    "collective_terms",
    "collective_latency_s",
    "fsdp_unit_collective_s",
    "measured_collective_s",
    "check_group",
]

def check_group(cluster: Cluster, group_size: int, stride: int) -> None:
    # the common, valid case in one test: the planner asks this ~100,000 times per search
    if type(group_size) is int and type(stride) is int and 0 < group_size and 0 < stride \
            and group_size * stride <= cluster.world_size:
        return
    _check_positive_int("group_size", group_size)
    _check_positive_int("stride", stride)
    if group_size * stride > cluster.world_size:
        raise ValueError(
            f"a group of {group_size} ranks {stride} apart spans {group_size * stride} ranks, more than the "
            f"cluster's world size {cluster.world_size}; use a smaller group or stride"
        )


def group_link(cluster: Cluster, group_size: int, stride: int) -> tuple[float, float]:
    """(bandwidth_Bps, latency_s) of a group of ``group_size`` ranks ``stride`` apart in the flat rank order.

    The group stays in one node when ``group_size × stride ≤ devices_per_node``; otherwise it crosses nodes.
    Ranks are laid out pp-major, then dp, then tp innermost, so a tp group has stride 1 and a dp group stride tp.
    A ring that crosses nodes runs at the speed of its slowest hop, one rank's inter-node NIC.

    Example:
        >>> c = Cluster.preset("a100-80gb", nodes=2)
        >>> group_link(c, 8, 1)          # NVLink inside one DGX
        (300000000000.0, 5e-06)
        >>> group_link(c, 2, 8)          # one rank on each node: InfiniBand
        (25000000000.0, 1e-05)
    """
    check_group(cluster, group_size, stride)
    if group_size == 1 or group_size * stride <= cluster.devices_per_node:
        return cluster.intra_node_bandwidth_Bps, cluster.intra_node_latency_s
    return cluster.inter_node_bandwidth_Bps, cluster.inter_node_latency_s


def _nodes_of_group(cluster: Cluster, group_size: int, stride: int) -> tuple[int, int] | None:
    """(members per node k, nodes m) of a group that spans nodes with several members on each; ``None`` when
    it fits in one node, has one member per node, or does not tile the nodes evenly (then: a flat ring)."""
    if group_size * stride <= cluster.devices_per_node:
        return None
    per_node = max(1, cluster.devices_per_node // stride)
    if per_node == 1 or group_size % per_node:
        return None
    return per_node, group_size // per_node


def group_allreduce_s(nbytes: float, cluster: Cluster, group_size: int, stride: int) -> float:
    """All-reduce over a group laid out as in :func:`group_link`; hierarchical (intra-node reduce-scatter,
    inter-node all-reduce, intra-node all-gather) when it spans nodes.

    With k members of the group per node (k = devices_per_node / stride) and m = group_size / k nodes:
    RS(nbytes, k, NVLink) + AR(nbytes / k, m, NIC) + AG(nbytes, k, NVLink). The k inter-node all-reduces run
    at once, each on its own rank's NIC. This is the 2D/hierarchical all-reduce of Horovod
    (HOROVOD_HIERARCHICAL_ALLREDUCE) and of Mikami et al., "Massively Distributed SGD: ImageNet/ResNet-50
    Training in a Flash" (2018, 2D-torus all-reduce), and what NCCL's intra-node-then-inter-node rings
    achieve. When each node holds one member (k = 1) it is a flat ring over the NICs.

    Example:
        >>> c = Cluster.preset("a100-80gb", nodes=2)   # 300 GB/s NVLink, 25 GB/s NIC per GPU
        >>> flat_ib = allreduce_s(1e9, 16, bandwidth_Bps=25e9, latency_s=10e-6)
        >>> group_allreduce_s(1e9, c, 16, 1) < flat_ib
        True
    """
    measured = measured_collective_s(cluster, "all_reduce", group_size, stride, nbytes)
    if measured is not None:
        return measured
    # RS(k) + AR(m) + AG(k) = 2·AG(nbytes, k) + 2·AG(nbytes / k, m), since a ring all-reduce costs two
    # all-gathers and a reduce-scatter one: twice the two-level all-gather, flat or across nodes.
    return 2 * _formula_allgather_s(nbytes, cluster, group_size, stride)


def group_allgather_s(nbytes: float, cluster: Cluster, group_size: int, stride: int) -> float:
    """All-gather of a result of ``nbytes`` over a group laid out as in :func:`group_link`; two-level when it
    spans nodes.

    Across nodes (k members per node, m nodes): the k inter-node all-gathers of the members with the same
    local index run at once, one per NIC, each gathering nbytes / k; then an intra-node all-gather assembles
    the whole: AG(nbytes / k, m, NIC) + AG(nbytes, k, NVLink). This is the 2D all-gather that ZeRO++'s
    hierarchical partitioning and FSDP's hybrid sharding build on (Wang et al. 2023, ZeRO++ §3.2); NCCL reaches
    the same NIC parallelism with one ring per NIC.

    Example:
        >>> c = Cluster.preset("a100-80gb", nodes=2)
        >>> round(group_allgather_s(1.6e9, c, 16, 1) * 1e3, 2)   # 0.2 GB over IB, then 1.6 GB over NVLink
        8.71
    """
    measured = measured_collective_s(cluster, "all_gather", group_size, stride, nbytes)
    return measured if measured is not None else _formula_allgather_s(nbytes, cluster, group_size, stride)


def _formula_allgather_s(nbytes: float, cluster: Cluster, group_size: int, stride: int) -> float:
    _check_non_negative("nbytes", nbytes)
    latency_s, seconds_per_byte = group_allgather_terms(cluster, group_size, stride)
    return latency_s + nbytes * seconds_per_byte


def group_allgather_terms(cluster: Cluster, group_size: int, stride: int) -> tuple[float, float]:
    """(latency_s, seconds_per_byte) of :func:`group_allgather_s`, which is affine in the bytes gathered.

    A ring of n ranks on one link takes (n−1)·latency + (n−1)/n · nbytes / bandwidth; the two-level form adds
    the inter-node ring over nbytes / k and the intra-node ring over nbytes. What is linear in the bytes (the
    data-parallel sync, which grows with a rank's parameters) is priced from these two figures.

    Example:
        >>> c = Cluster.preset("a100-80gb")                          # 8 GPUs, 300 GB/s NVLink, 5 µs
        >>> latency_s, per_byte = group_allgather_terms(c, 4, 1)
        >>> round(latency_s * 1e6, 1), round(per_byte * 300e9, 4)    # 3 steps; 3/4 of the bytes per link
        (15.0, 0.75)
    """
    check_group(cluster, group_size, stride)
    if group_size == 1:
        return 0.0, 0.0
    bandwidth_Bps, latency_s = group_link(cluster, group_size, stride)
    split = _nodes_of_group(cluster, group_size, stride)
    if split is None:
        return (group_size - 1) * latency_s, (group_size - 1) / group_size / bandwidth_Bps
    per_node, nodes = split
    # AG(nbytes / k, m, NIC) + AG(nbytes, k, NVLink)
    return ((nodes - 1) * latency_s + (per_node - 1) * cluster.intra_node_latency_s,
            (nodes - 1) / nodes / per_node / bandwidth_Bps
            + (per_node - 1) / per_node / cluster.intra_node_bandwidth_Bps)


def group_reduce_scatter_s(nbytes: float, cluster: Cluster, group_size: int, stride: int) -> float:
    """Reduce-scatter of an input of ``nbytes`` over a group laid out as in :func:`group_link`: the mirror
    of :func:`group_allgather_s` (intra-node reduce-scatter, then inter-node reduce-scatter of nbytes / k).

    Example:
        >>> c = Cluster.preset("a100-80gb", nodes=2)
        >>> group_reduce_scatter_s(1.6e9, c, 16, 1) == group_allgather_s(1.6e9, c, 16, 1)
        True
    """
    measured = measured_collective_s(cluster, "reduce_scatter", group_size, stride, nbytes)
    return measured if measured is not None else _formula_allgather_s(nbytes, cluster, group_size, stride)


def group_p2p_s(nbytes: float, cluster: Cluster, pp: int, stride: int) -> float:
    """One send between neighbouring ranks of a pipeline of ``pp`` ranks ``stride`` apart: measured
    (``cluster.collective_times["send"]``, pairs sending at once) when the pipeline fits in a node, else
    :func:`p2p_s` on the link of :func:`group_link`.

    Example:
        >>> c = Cluster.preset("a100-80gb", nodes=2)
        >>> round(group_p2p_s(50e6, c, 2, 8) * 1e3, 3)          # across nodes: 2 ms + 10 µs over InfiniBand
        2.01
    """
    measured = measured_collective_s(cluster, "send", 2, stride, nbytes, span=pp)
    if measured is not None:
        return measured
    bandwidth_Bps, latency_s = group_link(cluster, pp, stride)
    return p2p_s(nbytes, bandwidth_Bps=bandwidth_Bps, latency_s=latency_s)


def group_alltoall_s(nbytes: float, cluster: Cluster, group_size: int, stride: int,
                     moved: float | None = None) -> float:
    """All-to-all of a send buffer of ``nbytes`` per rank over a group laid out as in :func:`group_link`: measured
    (``cluster.collective_times["all_to_all"]``) inside a node, else :func:`alltoall_s` on the group's link. A group
    that spans nodes runs at its slowest hop, the NIC, for every share (a two-level form would send only the shares
    for other nodes over it; the tensor-parallel groups that issue all-to-alls sit inside one node).

    ``moved``: the fraction of the buffer the busiest rank sends to (and receives from) other ranks when the shares
    are unequal (:attr:`Collective.moved`); it is priced as the balanced all-to-all that moves as much, of
    ``nbytes · moved · n/(n−1)``: the exchange ends when its busiest link has carried its bytes.

    Example:
        >>> c = Cluster.preset("a100-80gb")                             # 300 GB/s NVLink, 5 µs
        >>> round(group_alltoall_s(39.3e6, c, 2, 1) * 1e6, 1)           # 19.7 MB leave each rank
        70.5
        >>> round(group_alltoall_s(39.3e6, c, 2, 1, moved=1 / 3) * 1e6, 1)   # Phi-3-medium's qkv_proj rows, t = 2
        48.7
    """
    if moved is not None and group_size > 1:
        nbytes = nbytes * moved * group_size / (group_size - 1)
    measured = measured_collective_s(cluster, "all_to_all", group_size, stride, nbytes)
    if measured is not None:
        return measured
    bandwidth_Bps, latency_s = group_link(cluster, group_size, stride)
    return alltoall_s(nbytes, group_size, bandwidth_Bps=bandwidth_Bps, latency_s=latency_s)


def group_broadcast_s(nbytes: float, cluster: Cluster, group_size: int, stride: int) -> float:
    """A broadcast of ``nbytes`` from one member to a group laid out as in :func:`group_link`: measured
    (``cluster.collective_times["broadcast"]``) inside a node, else :func:`broadcast_s` on the group's link (a
    chain that crosses nodes runs at its slowest hop).

    Example:
        >>> round(group_broadcast_s(4, Cluster.preset("a100-80gb"), 4, 1) * 1e6, 1)   # 3 hops of 5 µs
        15.0
    """
    measured = measured_collective_s(cluster, "broadcast", group_size, stride, nbytes)
    if measured is not None:
        return measured
    bandwidth_Bps, latency_s = group_link(cluster, group_size, stride)
    return broadcast_s(nbytes, group_size, bandwidth_Bps=bandwidth_Bps, latency_s=latency_s)


def measured_collective_s(cluster: Cluster, kind: str, group_size: int, stride: int, nbytes: float,
                          span: int | None = None) -> float | None:
    """Seconds of one ``kind`` collective of ``nbytes`` over ``group_size`` ranks ``stride`` apart from the
    cluster's measured points (:attr:`autoplan.Cluster.collective_times`), or ``None`` when there are none for
    that kind and size or the group (``span`` ranks ``stride`` apart, default ``group_size``) leaves the node.

    Between points the time is linear in the bytes; below the smallest it is the smallest's time (latency
    bound); above the largest it follows the last segment's slope (bandwidth bound).

    Example:
        >>> from dataclasses import replace
        >>> c = replace(Cluster.preset("cpu"), collective_times={"all_reduce": {"2": [[0, 1e-4], [1e6, 1.1e-3]]}})
        >>> round(measured_collective_s(c, "all_reduce", 2, 1, 5e5) * 1e3, 3), round(
        ...     measured_collective_s(c, "all_reduce", 2, 1, 2e6) * 1e3, 3)
        (0.6, 2.1)
        >>> measured_collective_s(c, "all_gather", 2, 1, 5e5) is None
        True
    """
    _check_non_negative("nbytes", nbytes)
    if group_size < 2 or (span or group_size) * stride > cluster.devices_per_node:
        return None
    points = cluster.collective_points(kind, group_size)
    if not points:
        return None
    return _interpolate(points, nbytes)


def _interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    if len(points) == 1 or x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (x - x0) * (y1 - y0) / (x1 - x0)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + (x - x1) * max(0.0, (y1 - y0) / (x1 - x0))


def collective_latency_s(cluster: Cluster, kind: str, group_size: int, stride: int) -> float:
    """Seconds of one ``kind`` collective that carries (almost) nothing: the smallest measured message's time,
    else the alpha-beta formula's latency term (:func:`collective_terms`).

    Example:
        >>> round(collective_latency_s(Cluster.preset("a100-80gb"), "all_gather", 8, 1) * 1e6)   # 7 × 5 µs
        35
    """
    if group_size > 1 and group_size * stride <= cluster.devices_per_node:
        points = cluster.collective_points(kind, group_size)
        if points:
            return points[0][1]
    return collective_terms(cluster, kind, group_size, stride)[0]


def fsdp_unit_collective_s(cluster: Cluster, kind: str, nbytes: float, group_size: int, stride: int) -> float:
    """Seconds of one FSDP unit's ``kind`` ("all_gather" or "reduce_scatter") of ``nbytes``: its calibrated line as
    it runs in a step ("fsdp_all_gather", "fsdp_reduce_scatter": :func:`autoplan.busy_bench.fsdp_collectives_in_step_s`,
    the line through its two points), else the collective's own time (:func:`group_allgather_s`,
    :func:`group_reduce_scatter_s`). With ``nbytes`` = 0 this is the unit's latency.

    Example:
        >>> c = Cluster.preset("a100-80gb")
        >>> fsdp_unit_collective_s(c, "all_gather", 0, 8, 1) == collective_latency_s(c, "all_gather", 8, 1)
        True
    """
    measured = f"fsdp_{kind}"
    if measured not in MEASURED_SYNC_KINDS:
        raise ValueError(f"FSDP units issue all_gather and reduce_scatter, not {kind!r}")
    if (group_size > 1 and group_size * stride <= cluster.devices_per_node
            and cluster.collective_points(measured, group_size)):
        latency_s, per_byte = collective_terms(cluster, measured, group_size, stride)
        return latency_s + nbytes * per_byte
    if nbytes == 0:
        return collective_latency_s(cluster, kind, group_size, stride)
    price = group_allgather_s if kind == "all_gather" else group_reduce_scatter_s
    return price(nbytes, cluster, group_size, stride)


def collective_terms(cluster: Cluster, kind: str, group_size: int, stride: int) -> tuple[float, float]:
    """(latency_s, seconds_per_byte) of one ``kind`` collective over a group laid out as in :func:`group_link`,
    as an affine function of its bytes (what the data-parallel sync, linear in a rank's parameters, is priced
    from). From measured points: the line through the two largest (data-parallel messages are large); else the
    alpha-beta formulas (an all-reduce costs two all-gathers, a reduce-scatter one; a send one hop; a broadcast n−1
    hops and its bytes once; an all-to-all (n−1) steps on the group's link, :func:`group_alltoall_s`).

    Example:
        >>> c = Cluster.preset("a100-80gb")                          # 8 GPUs, 300 GB/s NVLink, 5 µs
        >>> [round(x * 1e6, 1) for x in collective_terms(c, "all_reduce", 4, 1)[:1]]   # 6 ring steps
        [30.0]
    """
    if kind not in COLLECTIVE_KINDS + MEASURED_SYNC_KINDS:
        raise ValueError(f"unknown collective kind {kind!r}; use one of {COLLECTIVE_KINDS + MEASURED_SYNC_KINDS}")
    check_group(cluster, group_size, stride)
    if group_size == 1:
        return 0.0, 0.0
    points = () if group_size * stride > cluster.devices_per_node else cluster.collective_points(kind, group_size)
    if len(points) >= 2:
        (x0, y0), (x1, y1) = points[-2], points[-1]
        slope = max(0.0, (y1 - y0) / (x1 - x0))
        return max(0.0, y1 - slope * x1), slope
    if kind in MEASURED_SYNC_KINDS:
        return collective_terms(cluster, MEASURED_SYNC_BASE[kind], group_size, stride)
    if kind in ("send", "broadcast"):
        bandwidth_Bps, latency_s = group_link(cluster, group_size, stride)
        return (1 if kind == "send" else group_size - 1) * latency_s, 1 / bandwidth_Bps
    if kind == "all_to_all":
        bandwidth_Bps, latency_s = group_link(cluster, group_size, stride)
        return (group_size - 1) * latency_s, (group_size - 1) / group_size / bandwidth_Bps
    latency_s, per_byte = group_allgather_terms(cluster, group_size, stride)
    weight = 2 if kind == "all_reduce" else 1
    return weight * latency_s, weight * per_byte


