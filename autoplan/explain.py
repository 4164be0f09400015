"""Pure formatters: graphs, plans and explanations as strings. No torch import, no side effects.

Example:
    >>> from autoplan.explain import format_bytes
    >>> format_bytes(3 * 2**30)
    '3.00 GiB'
"""

from __future__ import annotations

__all__ = ["format_bytes", "format_flops", "format_seconds", "format_count"]


def format_bytes(n: float) -> str:
    """Binary units: ``format_bytes(1536) == '1.50 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_flops(n: float) -> str:
    """Decimal units: ``format_flops(2.5e12) == '2.50 TFLOP'``."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("KFLOP", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def format_count(n: float) -> str:
    """``format_count(1.3e9) == '1.30B'``."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_seconds(s: float) -> str:
    """``format_seconds(0.0123) == '12.3 ms'``."""
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.1f} µs"
