"""How a layout runs a low precision: the one rule the executor applies and the cost model prices
(:func:`mixed_precision_mode`), and which traced bytes price it (:func:`low_precision_run`).

Example:
    >>> from autoplan.plan import Mesh
    >>> low_precision_run(mixed_precision_mode("bf16", "fsdp", Mesh(dp=4)))
    'bf16_weights'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .plan import Mesh

__all__ = ["mixed_precision_mode", "low_precision_run"]


def mixed_precision_mode(precision: str, data_parallel: str, mesh: Mesh) -> str:
    """How a layout runs its precision: the one rule the executor applies and the cost model prices.

    ``"fp32"``: nothing is cast. ``"autocast"``: ``torch.autocast`` around forward, fp32 parameters (one device
    per replica, or classic DDP without tensor or pipeline parallelism); each matmul's low-precision weight copy
    is cached for the region and saved for backward. ``"fsdp"``: FSDP2's ``MixedPrecisionPolicy`` gathers
    low-precision weights per layer and frees them after it (no lasting copy). ``"replicate"``: DDP composed with
    tensor or pipeline parallelism runs FSDP2's ``replicate`` with the same policy, whose unsharded
    low-precision weights stay from forward to backward (one lasting copy, as under autocast).

    Example:
        >>> from autoplan.plan import Mesh
        >>> [mixed_precision_mode(p, d, Mesh(**m)) for p, d, m in [("fp32", "ddp", {"dp": 4}),
        ...     ("bf16", "ddp", {"dp": 4}), ("bf16", "ddp", {"dp": 4, "tp": 2}), ("bf16", "fsdp", {"dp": 4}),
        ...     ("bf16", "fsdp", {"tp": 2})]]
        ['fp32', 'autocast', 'replicate', 'fsdp', 'autocast']
    """
    if precision == "fp32":
        return "fp32"
    if mesh.dp == 1 or (data_parallel == "ddp" and mesh.tp == 1 and mesh.pp == 1):
        return "autocast"
    return "fsdp" if data_parallel == "fsdp" else "replicate"


def low_precision_run(mixed_precision: str) -> str | None:
    """Which of the ways a low precision runs (``"autocast"``, ``"bf16_weights"``: the
    :class:`autoplan.graph.Layer` fields :mod:`autoplan.trace.low_precision_bytes` fills) prices a layout's bytes,
    from how it runs its precision (:func:`mixed_precision_mode`); None for fp32 (the traced bytes as they are).

    Example:
        >>> [low_precision_run(m) for m in ("fp32", "autocast", "fsdp", "replicate")]
        [None, 'autocast', 'bf16_weights', 'bf16_weights']
    """
    runs = {"fp32": None, "autocast": "autocast", "fsdp": "bf16_weights", "replicate": "bf16_weights"}
    if mixed_precision not in runs:
        raise ValueError(f"unknown mixed precision {mixed_precision!r}; use what "
                         f"autoplan.mixed_precision.mixed_precision_mode returns: {', '.join(runs)}")
    return runs[mixed_precision]
