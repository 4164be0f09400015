"""Pictures of a plan (optional matplotlib: ``pip install autoplan[viz]``).

One figure, two panels:

* top — the predicted timeline of one training step (:func:`autoplan.timeline.timeline`): per pipeline rank its
  forward, recompute and backward blocks per microbatch in the order the schedule runs them, the bubbles between
  them, and the data-parallel gradient sync and optimizer step at the end, on a time axis in seconds; a dashed
  line marks ``plan.predicted.step_time_s``;
* bottom — the peak memory of one device of each pipeline rank by kind (parameters, gradients, optimizer states,
  activations, transients: ``plan.predicted.ranks``) against the device's usable memory.

Every length drawn is a figure of ``plan.predicted``; nothing is recomputed here.

Example:
    >>> import os, tempfile
    >>> from autoplan.synthetic import pipeline_plan as small_plan
    >>> from autoplan.viz import draw
    >>> path = draw(small_plan("1f1b"), os.path.join(tempfile.mkdtemp(), "plan.svg"))
    >>> path.suffix, path.stat().st_size > 1000
    ('.svg', True)
"""

from __future__ import annotations

from pathlib import Path

from .plan import MEMORY_KINDS
from .timeline import timeline

__all__ = ["figure", "draw", "FORMATS", "COLORS"]

#: File types :func:`draw` writes (by the path's suffix).
FORMATS = (".png", ".svg", ".pdf")

#: One colour per block kind and memory kind (colour-blind safe: Okabe & Ito 2008).
COLORS = {
    "forward": "#0072B2", "recompute": "#CC79A7", "backward": "#E69F00", "dp_sync": "#009E73", "optimizer": "#D55E00",
    "parameters": "#0072B2", "gradients": "#56B4E9", "optimizer_states": "#009E73", "activations": "#E69F00",
    "transients": "#CC79A7",
}

_LABELS = {"forward": "forward", "recompute": "recompute", "backward": "backward", "dp_sync": "data-parallel sync",
           "optimizer": "optimizer step", "parameters": "parameters", "gradients": "gradients",
           "optimizer_states": "optimizer states", "activations": "activations", "transients": "transients"}

_GIB = 2**30


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "plan pictures need matplotlib, which is not installed: pip install 'autoplan[viz]' (or pip install "
            "matplotlib); the text timeline in plan.explain() needs nothing"
        ) from exc
    return Figure


def _seconds_unit(end_s: float) -> tuple[float, str]:
    if end_s >= 1:
        return 1.0, "s"
    if end_s >= 1e-3:
        return 1e3, "ms"
    return 1e6, "µs"


def figure(plan):
    """The plan's picture as a matplotlib ``Figure`` (for notebooks; :func:`draw` saves it to a file).

    ``ValueError`` when the plan records no per-stage prediction; ``ImportError`` naming ``autoplan[viz]`` when
    matplotlib is missing.

    Example:
                >>> from autoplan.synthetic import pipeline_plan as small_plan
        >>> [ax.get_title(loc="left") for ax in figure(small_plan("gpipe")).axes]
        ['Predicted timeline of one step', 'Peak memory per device']
    """
    Figure = _matplotlib()
    blocks = timeline(plan)  # raises before any drawing when the plan has no figures
    p, m = plan.predicted, plan.mesh
    pp = m.pp
    end_s = max(max(b.end_s for b in blocks), p.step_time_s)
    scale, unit = _seconds_unit(end_s)
    fig = Figure(figsize=(11, min(16.0, 2.6 + 0.7 * pp)), dpi=100, layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[1.25, 1])

    v = f", {plan.virtual_stages} virtual stages" if plan.virtual_stages > 1 else ""
    fig.suptitle(f"{plan.model.name} on {plan.cluster.world_size} × {plan.cluster.device.name}: pp{m.pp} × dp{m.dp} "
                 f"× tp{m.tp}, {plan.schedule}{v}, {plan.microbatches} microbatches of {plan.microbatch_size}, "
                 f"{plan.data_parallel.upper()}", fontsize=11)
    for kind in ("forward", "recompute", "backward", "dp_sync", "optimizer"):
        labelled = False
        for r in range(pp):
            spans = [(b.start_s * scale, b.duration_s * scale) for b in blocks
                     if b.rank == r and b.kind == kind and b.duration_s > 0]
            if spans:
                top.broken_barh(spans, (r - 0.38, 0.76), facecolors=COLORS[kind], edgecolors="white",
                                linewidth=0.3, label=None if labelled else _LABELS[kind])
                labelled = True
    for b in blocks:  # microbatch numbers where a block is wide enough to hold one
        if b.kind in ("forward", "backward") and b.duration_s >= end_s / 60:
            top.text((b.start_s + b.duration_s / 2) * scale, b.rank, str(b.microbatch), ha="center", va="center",
                     fontsize=7, color="white")
    top.axvline(p.step_time_s * scale, color="black", linestyle="--", linewidth=1)
    top.text(p.step_time_s * scale, -0.78, f"predicted step {p.step_time_s * scale:.3g} {unit} ", fontsize=8,
             va="center", ha="right")
    top.set_ylim(pp - 0.5, -1.05)
    top.set_yticks(range(pp), [f"rank {r}" for r in range(pp)])
    top.set_xlim(0, end_s * scale * 1.01)
    top.set_xlabel(f"time ({unit}); idle gaps are pipeline bubbles")
    top.set_title("Predicted timeline of one step", loc="left", fontsize=10)
    top.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)

    capacity = plan.cluster.device.usable_memory_bytes / _GIB
    left = [0.0] * pp
    for kind in MEMORY_KINDS:
        widths = [rank.memory_bytes[kind] / _GIB for rank in p.ranks]
        bottom.barh(range(pp), widths, left=left, height=0.7, color=COLORS[kind], label=_LABELS[kind])
        left = [a + b for a, b in zip(left, widths)]
    for r, total in enumerate(left):
        bottom.text(total, r, f" {total:.1f} GiB ({100 * total / capacity:.0f}%)", va="center", fontsize=8)
    bottom.axvline(capacity, color="black", linestyle="--", linewidth=1)
    bottom.text(capacity, -0.78, f"usable {capacity:.1f} GiB ", fontsize=8, va="center", ha="right")
    bottom.set_ylim(pp - 0.5, -1.05)
    bottom.set_yticks(range(pp), [f"rank {r}" for r in range(pp)])
    bottom.set_xlim(0, max(capacity, max(left)) * 1.18)
    bottom.set_xlabel("GiB per device (the worst device of each pipeline rank)")
    bottom.set_title("Peak memory per device", loc="left", fontsize=10)
    bottom.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return fig


def draw(plan, path: str | Path, dpi: int = 100) -> Path:
    """Save the plan's picture (:func:`figure`) to ``path``; the suffix picks the format (:data:`FORMATS`).

    Example:
        >>> import os, tempfile
        >>> from autoplan.synthetic import pipeline_plan as small_plan
        >>> draw(small_plan("interleaved"), os.path.join(tempfile.mkdtemp(), "plan.png")).stat().st_size > 1000
        True
    """
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"cannot draw a plan to {str(path)!r}: the file name must end in one of {FORMATS}")
    fig = figure(plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
