"""PlanOptions: the user's planning arguments, validated once, before any work is done.

Example:
    >>> from autoplan.options import PlanOptions
    >>> PlanOptions(mesh={"tp": 2}, recompute="full").mesh
    {'tp': 2}
    >>> PlanOptions(mesh={"tp": 1}, sequence_parallel=True)
    Traceback (most recent call last):
    ...
    ValueError: sequence_parallel=True needs tensor parallelism, but mesh pins tp=1; pin tp > 1, leave tp unpinned, or use sequence_parallel='auto'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .vocabulary import DATA_PARALLEL_KINDS, FSDP_RESHARD_MODES, MESH_AXES, OPTIMIZERS, PRECISIONS, RECOMPUTE_MODES, SCHEDULES

__all__ = ["PlanOptions"]

_CHOICES = {
    "precision": PRECISIONS,
    "optimizer": OPTIMIZERS,
    "recompute": RECOMPUTE_MODES,
    "data_parallel": ("auto",) + DATA_PARALLEL_KINDS,
    "schedule": ("auto",) + SCHEDULES,
    "fsdp_reshard": ("auto",) + FSDP_RESHARD_MODES,
}


@dataclass(frozen=True)
class PlanOptions:
    """What :func:`autoplan.plan` was asked for. ``None`` / ``"auto"`` means "search it"."""

    global_batch_size: int | None = None  # None: the batch dim of the example inputs
    precision: str = "bf16"
    optimizer: str = "adamw"
    mesh: dict[str, int] = field(default_factory=dict)  # pinned degrees among "pp", "dp", "tp"
    microbatch_size: int | None = None
    recompute: str = "auto"
    data_parallel: str = "auto"
    schedule: str = "auto"
    time_limit_s: float | None = None
    tp_across_nodes: bool = False  # allow tensor-parallel groups that span nodes
    sequence_parallel: str | bool = "auto"  # Megatron sequence parallelism: "auto" (searched), True, False
    expert_parallel: str | bool = False  # MoE experts sharded over the dp ranks: False, True, "auto" (if faster)
    fsdp_reshard: str = "auto"  # FSDP between microbatches: "auto" (searched), "step" (keep), "microbatch"

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not one of {choices}")
        mesh = self.mesh if self.mesh is not None else {}
        if not isinstance(mesh, dict):
            raise ValueError(f"mesh must be a dict like {{'dp': 2, 'tp': 2}}, got {type(mesh).__name__}")
        unknown = set(mesh) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh has unknown axes {sorted(unknown)}; axes are 'pp', 'dp', 'tp'")
        for axis, degree in mesh.items():
            if not isinstance(degree, int) or degree < 1:
                raise ValueError(f"mesh[{axis!r}] must be a positive int, got {degree!r}")
        object.__setattr__(self, "mesh", dict(mesh))
        for name in ("global_batch_size", "microbatch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        sp = self.sequence_parallel
        if not (sp == "auto" or isinstance(sp, bool)):
            raise ValueError(f"sequence_parallel must be 'auto', True or False, got {sp!r}")
        if sp is True and mesh.get("tp", 2) == 1:
            raise ValueError("sequence_parallel=True needs tensor parallelism, but mesh pins tp=1; pin tp > 1, leave "
                             "tp unpinned, or use sequence_parallel='auto'")
        ep = self.expert_parallel
        if not (ep == "auto" or isinstance(ep, bool)):
            raise ValueError(f"expert_parallel must be 'auto', True or False, got {ep!r}")
        if ep is True and (mesh.get("tp", 1) > 1 or mesh.get("pp", 1) > 1):
            raise ValueError(f"expert_parallel=True runs with data parallelism alone (tp = pp = 1, DDP or FSDP), "
                             f"but mesh={mesh} is pinned; unpin tp and pp or use expert_parallel='auto' (chosen only "
                             f"where the plan allows it)")
        if self.fsdp_reshard == "microbatch" and (self.data_parallel == "ddp" or mesh.get("pp", 1) > 1):
            raise ValueError(f"fsdp_reshard='microbatch' reshards FSDP's weights between microbatches, which needs "
                             f"FSDP and no pipeline, but data_parallel={self.data_parallel!r} and mesh={mesh} are "
                             f"pinned; use data_parallel='fsdp' without pp > 1, or fsdp_reshard='auto'")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be positive, got {self.time_limit_s}")
