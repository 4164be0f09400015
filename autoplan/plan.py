"""Plan: the layout autoplan chose, as frozen plain data with a versioned JSON form.

The executor reads nothing else. Pipeline stage ``k`` (in model order) runs on pipeline rank
``k % mesh.pp``; with ``virtual_stages > 1`` (interleaved schedule) each rank holds that many stages.

Example:
    >>> import autoplan
    >>> plan = autoplan.Plan.from_dict(autoplan.Plan.example().to_dict())
    >>> plan.mesh.world_size
    1
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .cluster import Cluster
from .mixed_precision import mixed_precision_mode
from .vocabulary import DATA_PARALLEL_KINDS as DATA_PARALLEL
from .plan_checks import check as _check
from .plan_checks import check_sequence_parallel, check_tp_pairs
from .vocabulary import OPTIMIZERS, PRECISIONS, SCHEDULES, TP_STYLES, tp_style_kind

__all__ = ["Mesh",
           "Stage", "StageTime", "RankFigures", "MEMORY_KINDS", "Predicted", "SearchInfo", "Alternative",
           "ModelInfo", "Plan", "PLAN_VERSION"]

PLAN_VERSION = 1


@dataclass(frozen=True)
class Mesh:
    """Degrees of the device mesh, outermost first: pipeline × data × tensor."""

    pp: int = 1
    dp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for axis in ("pp", "dp", "tp"):
            value = getattr(self, axis)
            _check(isinstance(value, int) and value >= 1, f"mesh.{axis} must be a positive int, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def to_dict(self) -> dict[str, int]:
        return {"pp": self.pp, "dp": self.dp, "tp": self.tp}

    def __str__(self) -> str:
        return f"pp{self.pp}×dp{self.dp}×tp{self.tp}"


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: the layers it runs (in order) and the modules it recomputes in backward."""

    layers: tuple[str, ...]
    recompute: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "recompute": list(self.recompute)}


@dataclass(frozen=True)
class StageTime:
    """One pipeline stage, one microbatch: the seconds the cost model charges (its ``T_k``, split by kind).

    ``comm_s`` is the stage's tensor-parallel collectives and pipeline sends (forward and backward together).
    """

    forward_s: float
    backward_s: float
    recompute_s: float = 0.0
    comm_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s + self.recompute_s + self.comm_s


#: The kinds of bytes a device holds, in the order pictures stack them (see :class:`RankFigures`).
MEMORY_KINDS = ("parameters", "gradients", "optimizer_states", "activations", "transients")


@dataclass(frozen=True)
class RankFigures:
    """One pipeline rank (its worst device): what follows the last backward, and its peak memory by kind.

    ``transients_bytes`` is everything alive only part of the step: rematerialised activations and FSDP's gathered
    weights of one layer, pipeline send/receive buffers, autocast's low-precision weight copy, the loss buffers.
    """

    dp_sync_s: float
    optimizer_s: float
    parameters_bytes: int
    gradients_bytes: int
    optimizer_states_bytes: int
    activations_bytes: int
    transients_bytes: int

    @property
    def memory_bytes(self) -> dict[str, int]:
        """Bytes by kind, keys :data:`MEMORY_KINDS` in order."""
        return {kind: getattr(self, f"{kind}_bytes") for kind in MEMORY_KINDS}

    @property
    def peak_bytes(self) -> int:
        return sum(self.memory_bytes.values())


@dataclass(frozen=True)
class Predicted:
    """What the cost model predicts for one training iteration over the global batch.

    ``stages`` (one :class:`StageTime` per stage) and ``ranks`` (one :class:`RankFigures` per pipeline rank) are
    the figures the step time and memory were composed from; plans written before they existed have neither.
    """

    step_time_s: float
    peak_memory_bytes: tuple[int, ...]  # one per pipeline stage (its worst device)
    compute_s: float = 0.0
    comm_s: float = 0.0  # communication left exposed (not overlapped)
    bubble_s: float = 0.0
    recompute_s: float = 0.0
    optimizer_s: float = 0.0
    samples_per_s: float = 0.0
    stages: tuple[StageTime, ...] = ()
    ranks: tuple[RankFigures, ...] = ()

    def to_dict(self) -> dict:
        """JSON form; ``stages`` and ``ranks`` are left out when empty (the v1 form from before they existed)."""
        d = asdict(self)
        d["peak_memory_bytes"] = list(self.peak_memory_bytes)
        for key in ("stages", "ranks"):
            d[key] = [asdict(x) for x in getattr(self, key)]
            if not d[key]:
                del d[key]
        return d


@dataclass(frozen=True)
class Alternative:
    """A layout the search considered and did not choose, with why."""

    description: str  # e.g. "pp1×dp8×tp1, 1f1b, mb=2, ddp"
    step_time_s: float | None  # None when it does not fit
    reason: str  # e.g. "needs 91.2 GiB > 78.0 GiB" or "+12% step time: tp=16 crosses nodes"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SearchInfo:
    """How the plan was found."""

    solver: str = "cp-sat"
    status: str = "OPTIMAL"  # OPTIMAL | FEASIBLE | PINNED (user-given layout, only evaluated)
    wall_s: float = 0.0
    candidates: int = 0
    gap: float = 0.0  # relative optimality gap when FEASIBLE
    alternatives: tuple[Alternative, ...] = ()
    notes: tuple[str, ...] = ()  # what the user should know about the choice (e.g. why tp shards nothing)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["alternatives"] = [a.to_dict() for a in self.alternatives]
        if self.notes:
            d["notes"] = list(self.notes)
        else:
            del d["notes"]
        return d


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fingerprint: str
    num_params: int
    tokens_per_sample: int | None = None  # sequence length when the inputs are token ids (for tokens/s)


@dataclass(frozen=True)
class Plan:
    """A complete parallel layout. Build with :func:`autoplan.plan`; save, load, edit, apply."""

    model: ModelInfo
    cluster: Cluster
    global_batch_size: int
    microbatch_size: int
    microbatches: int
    mesh: Mesh
    schedule: str
    data_parallel: str
    stages: tuple[Stage, ...]
    tensor_parallel: dict[str, str] = field(default_factory=dict)
    precision: str = "fp32"
    optimizer: str = "adamw"
    virtual_stages: int = 1  # stages per pipeline rank (interleaved schedule)
    # Megatron sequence parallelism in the layers holding "sequence"-style modules (Korthikanti et al. 2022)
    sequence_parallel: bool = False
    # experts of mixture-of-experts layers sharded over this many data-parallel ranks (1: off; see execute.experts)
    expert_parallel: int = 1
    # FSDP between microbatches: "step" keeps the gathered weights through the step (several microbatches or a
    # pipeline), "microbatch" reshards after every forward and backward (autoplan.cost.fsdp_keeps_weights)
    fsdp_reshard: str = "step"
    predicted: Predicted | None = None
    search: SearchInfo = field(default_factory=SearchInfo)

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check internal consistency; ``ValueError`` naming the field and the arithmetic otherwise."""
        m = self.mesh
        _check(
            m.world_size == self.cluster.world_size,
            f"plan mesh {m} has {m.pp}×{m.dp}×{m.tp} = {m.world_size} devices but the cluster has "
            f"{self.cluster.world_size}",
        )
        _check(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(
            self.data_parallel in DATA_PARALLEL,
            f"data_parallel must be one of {DATA_PARALLEL}, got {self.data_parallel!r}",
        )
        _check(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        _check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _check(self.microbatch_size >= 1 and self.microbatches >= 1, "microbatch_size and microbatches must be ≥ 1")
        _check(
            self.microbatch_size * self.microbatches * m.dp == self.global_batch_size,
            f"microbatch_size × microbatches × dp = {self.microbatch_size}×{self.microbatches}×{m.dp} = "
            f"{self.microbatch_size * self.microbatches * m.dp} must equal global_batch_size {self.global_batch_size}",
        )
        _check(self.virtual_stages >= 1, f"virtual_stages must be ≥ 1, got {self.virtual_stages}")
        _check(
            len(self.stages) == m.pp * self.virtual_stages,
            f"{len(self.stages)} stages listed but pp × virtual_stages = {m.pp}×{self.virtual_stages} = "
            f"{m.pp * self.virtual_stages}",
        )
        _check(
            self.virtual_stages == 1 or self.schedule == "interleaved",
            f"virtual_stages={self.virtual_stages} needs schedule='interleaved', got {self.schedule!r}",
        )
        if m.pp > 1:
            _check(
                self.microbatches >= m.pp or self.schedule == "gpipe",
                f"schedule {self.schedule!r} needs microbatches ≥ pp ({self.microbatches} < {m.pp})",
            )
        if self.schedule == "interleaved":
            _check(
                self.microbatches % m.pp == 0,
                f"interleaved schedule needs microbatches ({self.microbatches}) divisible by pp ({m.pp})",
            )
        seen: set[str] = set()
        for i, stage in enumerate(self.stages):
            _check(len(stage.layers) > 0, f"stage {i} has no layers")
            for layer in stage.layers:
                _check(layer not in seen, f"layer {layer!r} appears in two stages")
                seen.add(layer)
        for fqn, style in self.tensor_parallel.items():
            _check(tp_style_kind(style) in TP_STYLES,
                   f"tensor_parallel[{fqn!r}] = {style!r}; styles are {TP_STYLES} (or colwise:K, K >= 2)")
        _check(m.tp > 1 or not self.tensor_parallel, "tensor_parallel styles given but mesh.tp is 1")
        check_tp_pairs(self.tensor_parallel)
        check_sequence_parallel(self)
        _check(isinstance(self.expert_parallel, int) and self.expert_parallel >= 1 and m.dp % self.expert_parallel == 0,
               f"expert_parallel={self.expert_parallel!r} must be a positive int dividing dp={m.dp} (the experts are "
               f"sharded over data-parallel ranks)")
        try:
            from .cost.step import check_fsdp_reshard

            check_fsdp_reshard(self.fsdp_reshard, m.pp)
        except ValueError as exc:
            raise ValueError(f"plan {exc}") from None
        _check(self.fsdp_reshard == "step" or self.data_parallel == "fsdp",
               f"fsdp_reshard={self.fsdp_reshard!r} applies to FSDP only, but data_parallel is "
               f"{self.data_parallel!r}; use data_parallel='fsdp' or drop fsdp_reshard")

    # -- derived ----------------------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(layer for stage in self.stages for layer in stage.layers)

    @property
    def recompute(self) -> tuple[str, ...]:
        return tuple(module for stage in self.stages for module in stage.recompute)

    @property
    def fsdp_keeps_weights(self) -> bool:
        """Whether FSDP keeps its gathered weights through a step of this plan: the executor's and the cost model's
        one rule, :func:`autoplan.cost.fsdp_keeps_weights` of its microbatches, pipeline degree and ``fsdp_reshard``.

        Example:
            >>> from autoplan.synthetic import pipeline_plan
            >>> pipeline_plan("gpipe").fsdp_keeps_weights
            True
        """
        from .cost.step import fsdp_keeps_weights

        return fsdp_keeps_weights(self.microbatches, self.mesh.pp, self.fsdp_reshard)

    @property
    def mixed_precision(self) -> str:
        """``"fp32"``, ``"autocast"``, ``"fsdp"`` or ``"replicate"``: see :func:`mixed_precision_mode`."""
        return mixed_precision_mode(self.precision, self.data_parallel, self.mesh)

    def replace(self, **changes: Any) -> "Plan":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    # -- JSON -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The v1 JSON form (see DESIGN: "Plan JSON")."""
        return {
            "autoplan_plan": PLAN_VERSION,
            "model": asdict(self.model),
            "cluster": self.cluster.to_dict(),
            "global_batch_size": self.global_batch_size,
            "microbatch_size": self.microbatch_size,
            "microbatches": self.microbatches,
            "mesh": self.mesh.to_dict(),
            "schedule": self.schedule,
            "virtual_stages": self.virtual_stages,
            "data_parallel": self.data_parallel,
            "precision": self.precision,
            "optimizer": self.optimizer,
            "stages": [s.to_dict() for s in self.stages],
            "tensor_parallel": dict(self.tensor_parallel),
            **({"sequence_parallel": True} if self.sequence_parallel else {}),  # absent: off (plans before it)
            **({"expert_parallel": self.expert_parallel} if self.expert_parallel > 1 else {}),  # absent: 1
            **({"fsdp_reshard": self.fsdp_reshard} if self.fsdp_reshard != "step" else {}),  # absent: "step"
            "predicted": self.predicted.to_dict() if self.predicted else None,
            "search": self.search.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """Rebuild a plan from :meth:`to_dict` output; ``PlanMismatchError`` for another version,
        ``ValueError`` naming the bad field otherwise."""
        from .errors import PlanMismatchError

        if not isinstance(data, dict) or "autoplan_plan" not in data:
            raise ValueError("not an autoplan plan: the JSON object has no 'autoplan_plan' version key")
        version = data["autoplan_plan"]
        if isinstance(version, bool) or version != PLAN_VERSION:
            raise PlanMismatchError(
                f"plan format version {version!r} is not supported by this autoplan (reads version "
                f"{PLAN_VERSION}); re-plan with autoplan.plan(...) or upgrade autoplan"
            )
        required = ("model", "cluster", "global_batch_size", "microbatch_size", "microbatches", "mesh",
                    "schedule", "data_parallel", "stages")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"plan JSON is missing keys {missing}")
        from .plan_json import plan_from_dict

        return plan_from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (never pickle).

        Example:
            >>> import tempfile, os, autoplan
            >>> p = os.path.join(tempfile.mkdtemp(), "plan.json")
            >>> autoplan.Plan.example().save(p); autoplan.Plan.load(p) == autoplan.Plan.example()
            True
        """
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan written by :meth:`save`, validating it."""
        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data)

    @classmethod
    def example(cls) -> "Plan":
        """A tiny valid plan (one device, one stage), for docs and tests."""
        return cls(
            model=ModelInfo("Example", "0" * 16, 0),
            cluster=Cluster.preset("cpu", nodes=1, devices_per_node=1),
            global_batch_size=1,
            microbatch_size=1,
            microbatches=1,
            mesh=Mesh(),
            schedule="1f1b",
            data_parallel="ddp",
            stages=(Stage(("layer",)),),
        )

    # -- presentation -----------------------------------------------------------------------------------------
    def __str__(self) -> str:
        from .explain import format_plan

        return format_plan(self)

    def explain(self) -> str:
        """Cost split, the predicted timeline (one line per pipeline rank) and the best alternatives with why
        each lost."""
        from .explain import explain_plan

        return explain_plan(self)

    def draw(self, path: str | Path) -> Path:
        """Save a picture of the plan (``.png``, ``.svg`` or ``.pdf``): the predicted timeline of one step per
        pipeline rank, and memory per device by kind against capacity. Needs matplotlib
        (``pip install 'autoplan[viz]'``); see :mod:`autoplan.viz`.

        Example:
            >>> import os, tempfile
            >>> from autoplan.synthetic import pipeline_plan as small_plan
            >>> small_plan("gpipe").draw(os.path.join(tempfile.mkdtemp(), "plan.svg")).suffix
            '.svg'
        """
        from .viz import draw

        return draw(self, path)
