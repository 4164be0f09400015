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
    from .cost.collectives import COLLECTIVE_KINDS

    if isinstance(table, dict):
        table = [(kind, int(n), pts) for kind, sizes in table.items() for n, pts in sizes.items()]
    out = []
    for kind, n, points in table:
        if kind not in COLLECTIVE_KINDS or int(n) < 2:
            raise ValueError(f"Cluster.collective_times: unknown kind {kind!r} or group size {n!r} < 2; kinds are "
                             f"{COLLECTIVE_KINDS}")
        pts = tuple(sorted((float(b), float(t)) for b, t in points))
        if not pts or any(not (b >= 0 and t > 0) for b, t in pts):
            raise ValueError(f"Cluster.collective_times[{kind!r}][{n}] needs (bytes ≥ 0, seconds > 0) points, "
                             f"got {points!r}")
        out.append((kind, int(n), pts))
    return tuple(sorted(out))
