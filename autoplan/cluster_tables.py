"""The measured tables a calibrated :class:`autoplan.Cluster` carries (``Device.matmul_efficiency``,
``Cluster.collective_times``): checked, normalised to sorted hashable tuples, and interpolated.

Example:
    >>> round(_interpolate_log(((1e3, 0.1), (1e5, 0.5)), 1e4), 6)     # halfway in log FLOPs
    0.3
"""

from __future__ import annotations

import math

from .vocabulary import PRECISIONS


def _efficiency_table(table) -> tuple[tuple[str, tuple[tuple[float, float], ...]], ...]:
    """``matmul_efficiency`` as sorted, hashable tuples, from a dict or pairs (JSON gives lists); checked."""
    items = table.items() if isinstance(table, dict) else table
    out = []
    for precision, points in items:
        if precision not in PRECISIONS:
            raise ValueError(f"Device.matmul_efficiency has unknown precision {precision!r}; use {PRECISIONS}")
        pts = tuple(sorted((float(f), float(e)) for f, e in points))
        if not pts or any(not (f > 0 and 0 < e <= 1) for f, e in pts):
            raise ValueError(f"Device.matmul_efficiency[{precision!r}] needs (flops > 0, 0 < fraction ≤ 1) "
                             f"points, got {points!r}")
        out.append((precision, pts))
    return tuple(sorted(out))


def _interpolate_log(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise-linear interpolation of ``points`` (x, y) in log x, clamped to the end values."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            w = math.log(x / x0) / math.log(x1 / x0) if x1 > x0 else 1.0
            return y0 + w * (y1 - y0)
    return points[-1][1]


def _collective_table(table) -> tuple[tuple[str, int, tuple[tuple[float, float], ...]], ...]:
    """``collective_times`` as sorted, hashable tuples, from the JSON dict ``{kind: {"n": [[bytes, s], ...]}}``
    or from triples; checked."""
    from .cost.collectives import COLLECTIVE_KINDS, MEASURED_SYNC_KINDS

    if isinstance(table, dict):
        table = [(kind, int(n), pts) for kind, sizes in table.items() for n, pts in sizes.items()]
    out = []
    for kind, n, points in table:
        if kind not in COLLECTIVE_KINDS + MEASURED_SYNC_KINDS or int(n) < 2:
            raise ValueError(f"Cluster.collective_times: unknown kind {kind!r} or group size {n!r} < 2; kinds are "
                             f"{COLLECTIVE_KINDS + MEASURED_SYNC_KINDS}")
        pts = tuple(sorted((float(b), float(t)) for b, t in points))
        if not pts or any(not (b >= 0 and t > 0) for b, t in pts):
            raise ValueError(f"Cluster.collective_times[{kind!r}][{n}] needs (bytes ≥ 0, seconds > 0) points, "
                             f"got {points!r}")
        out.append((kind, int(n), pts))
    return tuple(sorted(out))


#: The wrappers whose fixed per-layer cost ``Device.group_layer_overhead`` holds per group size: DTensor tensor
#: parallelism ("tp"), an FSDP2 unit that reshards after forward ("fsdp", ZeRO-3: it gathers again for backward), one
#: that keeps its gathered weights between microbatches ("fsdp_keep": reshard and gradient sync off, what the executor
#: runs under several microbatches or a pipeline) and FSDP2's ``replicate`` root ("replicate": DDP composed with
#: tensor or pipeline parallelism, gradient sync off; its all-reduce is the data-parallel sync's).
GROUP_OVERHEAD_KINDS = ("tp", "fsdp", "fsdp_keep", "replicate")


def _group_overhead_table(table) -> tuple[tuple[str, tuple[tuple[int, float], ...]], ...]:
    """``group_layer_overhead`` as sorted, hashable tuples, from the JSON dict ``{kind: {"n": seconds}}`` or from
    ``(kind, ((n, seconds), ...))`` pairs; checked.

    Example:
        >>> _group_overhead_table({"tp": {"4": 2e-3, "2": 1e-3}})
        (('tp', ((2, 0.001), (4, 0.002))),)
    """
    items = table.items() if isinstance(table, dict) else table
    out = []
    for kind, points in items:
        pairs = points.items() if isinstance(points, dict) else points
        if kind not in GROUP_OVERHEAD_KINDS:
            raise ValueError(f"Device.group_layer_overhead has unknown kind {kind!r}; use {GROUP_OVERHEAD_KINDS}")
        pts = tuple(sorted((int(n), float(s)) for n, s in pairs))
        if not pts or any(not (n >= 2 and s >= 0) for n, s in pts):
            raise ValueError(f"Device.group_layer_overhead[{kind!r}] needs (group size ≥ 2, seconds ≥ 0) points, "
                             f"got {points!r}; write it with autoplan.calibrate")
        out.append((kind, pts))
    return tuple(sorted(out))


def group_layer_overhead_s(device, kind: str, group_size: int) -> float:
    """Extra fixed forward seconds of a layer under ``kind`` (:data:`GROUP_OVERHEAD_KINDS`) over a group of
    ``group_size`` ranks: the device's measured points for ``kind`` (``Device.group_layer_overhead``) interpolated
    in log group size and clamped to the end points, or, when there are none, the size-free figure
    (``tp_layer_overhead_s`` / ``fsdp_layer_overhead_s``); a cluster calibrated before "fsdp_keep" and
    "replicate" were measured reads the "fsdp" figure for the first and 0 for the second, as it was priced then.

    Example:
        >>> from autoplan.cluster import Device
        >>> d = Device("toy", 2**30, {"fp32": 1e9, "bf16": 1e9, "fp16": 1e9}, tp_layer_overhead_s=5e-3,
        ...            group_layer_overhead={"tp": {"2": 1e-3, "8": 4e-3}})
        >>> [round(group_layer_overhead_s(d, "tp", n) * 1e3, 3) for n in (2, 4, 16)]
        [1.0, 2.5, 4.0]
        >>> group_layer_overhead_s(d, "fsdp", 4)      # no points for FSDP: the size-free figure
        0.0
    """
    if kind not in GROUP_OVERHEAD_KINDS:
        raise ValueError(f"unknown overhead kind {kind!r}; use {GROUP_OVERHEAD_KINDS}")
    points = dict(device.group_layer_overhead).get(kind)
    if not points:
        if kind == "replicate":
            return 0.0
        if kind == "fsdp_keep":
            return group_layer_overhead_s(device, "fsdp", group_size)
        return device.tp_layer_overhead_s if kind == "tp" else device.fsdp_layer_overhead_s
    return _interpolate_log(tuple((float(n), s) for n, s in points), float(group_size))
