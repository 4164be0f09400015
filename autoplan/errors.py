"""The errors autoplan raises. Each message states the problem, the numbers and the way out."""

from __future__ import annotations

__all__ = ["AutoplanError", "TraceError", "InfeasiblePlanError", "PlanMismatchError"]


class AutoplanError(Exception):
    """Base class of every autoplan error."""


class TraceError(AutoplanError):
    """The model could not be traced: the message names the module/op and what to try instead."""


class InfeasiblePlanError(AutoplanError):
    """No layout fits the cluster's memory: the message gives the least memory needed and what to relax."""

    def __init__(self, message: str, *, min_memory_bytes: int | None = None, capacity_bytes: int | None = None):
        super().__init__(message)
        self.min_memory_bytes = min_memory_bytes
        self.capacity_bytes = capacity_bytes


class PlanMismatchError(AutoplanError):
    """A plan was made for another model, world size or format version."""
