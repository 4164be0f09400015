"""Argument checks shared by the cost-model modules: one place, one sentence each, so every public function
fails the same way on bad input.

Example:
    >>> from autoplan._checks import check_positive_int
    >>> check_positive_int("dp", 2)
"""

from __future__ import annotations

from .vocabulary import PRECISIONS


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be ≥ 0, got {value!r}")


def check_link(bandwidth_Bps: float, latency_s: float) -> None:
    if bandwidth_Bps <= 0:
        raise ValueError(f"bandwidth_Bps must be positive, got {bandwidth_Bps!r}")
    if latency_s < 0:
        raise ValueError(f"latency_s must be ≥ 0, got {latency_s!r}")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)

