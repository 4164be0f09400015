"""The predicted timeline of one training step: per pipeline rank, which forward, backward and recompute block runs
when, the pipeline bubbles between them, and the data-parallel sync and optimizer step at the end. Pure functions
of a plan; no torch import.

Two parts:

* :func:`schedule_order` — per pipeline rank, the order in which the plan's schedule runs forward (``F``) and
  backward (``B``) of each (stage, microbatch): GPipe (all forwards, then all backwards: Huang et al. 2019), 1F1B
  (pp − r − 1 warm-up forwards on rank r, then one forward and one backward in turn: Narayanan et al. SC'21 §2.2.1)
  and interleaved 1F1B (depth-first over the rank's v chunks in rounds of pp microbatches, SC'21 §2.2.2). These
  are the orders ``torch.distributed.pipelining``'s ``ScheduleGPipe``, ``Schedule1F1B`` and
  ``ScheduleInterleaved1F1B`` run (their ``pipeline_order``; tests/test_viz.py compares them).
* :func:`timeline` — the blocks laid on a time axis: each rank runs its actions in that order, each as soon as
  the rank is free and its input exists (forward of stage k after forward of stage k − 1 for that microbatch;
  backward of stage k after backward of stage k + 1, or after its own forward on the last stage).

Block lengths are the plan's own predicted figures (``plan.predicted.stages``, one :class:`~autoplan.plan.StageTime`
per stage and microbatch), never recomputed: a forward block is the stage's ``forward_s`` plus half its ``comm_s``
(tensor-parallel collectives and pipeline sends run in both directions), a backward block ``backward_s`` plus the
other half, preceded by a ``recompute_s`` block when the stage recomputes. After its last backward each rank runs
its data-parallel gradient sync and optimizer step (``plan.predicted.ranks``).

Example:
    >>> from autoplan.timeline import schedule_order
    >>> [str(a) for a in schedule_order("1f1b", pp=2, microbatches=3)[0]]
    ['F0.0', 'F0.1', 'B0.0', 'F0.2', 'B0.1', 'B0.2']
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Action", "Block", "BLOCK_KINDS", "ALTERNATING", "schedule_order", "simulate", "timeline", "format_timeline"]

#: What a block of the timeline is, in drawing order; the letter of each in the text timeline.
BLOCK_KINDS = {"forward": "F", "recompute": "r", "backward": "B", "dp_sync": "s", "optimizer": "o"}
#: The text timeline's letter for a column where forwards and backwards alternate (each an eighth of it or more).
ALTERNATING = "x"


@dataclass(frozen=True)
class Action:
    """One computation of a pipeline rank: forward (``"F"``) or backward (``"B"``) of a stage on a microbatch."""

    kind: str
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.stage}.{self.microbatch}"


@dataclass(frozen=True)
class Block:
    """A span of one rank's time: a kind from :data:`BLOCK_KINDS`, its stage and microbatch (None for the
    data-parallel sync and the optimizer step), and when it starts and ends, in seconds from the step's start."""

    rank: int
    kind: str
    stage: int | None
    microbatch: int | None
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def schedule_order(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1) -> list[list[Action]]:
    """Per pipeline rank, its forward and backward actions in the order ``schedule`` runs them.

    Stage k runs on rank k mod pp. Interleaved: rank r's chunks are stages r, r + pp, …, r + (v − 1)·pp; it runs
    ``(v − 1)·R + 2(pp − 1 − r)`` warm-up forwards (R microbatches per round, ``microbatches // max(1,
    microbatches // pp)``), then alternates one forward and one backward, then drains its backwards; forward step
    j uses chunk ``(j // R) mod v``, backward step j chunk ``v − 1 − ((j − warm-up) // R) mod v``.

    Example:
        >>> [" ".join(map(str, rank)) for rank in schedule_order("gpipe", pp=2, microbatches=2)]
        ['F0.0 F0.1 B0.0 B0.1', 'F1.0 F1.1 B1.0 B1.1']
        >>> " ".join(map(str, schedule_order("interleaved", pp=2, microbatches=2, virtual_stages=2)[1]))
        'F1.0 F1.1 F3.0 B3.0 F3.1 B3.1 B1.0 B1.1'
    """
    _check_positive("pp", pp)
    _check_positive("microbatches", microbatches)
    _check_positive("virtual_stages", virtual_stages)
    if schedule not in ("gpipe", "1f1b", "interleaved"):
        raise ValueError(f"unknown schedule {schedule!r}; use one of ('gpipe', '1f1b', 'interleaved')")
    if schedule != "interleaved" and virtual_stages != 1:
        raise ValueError(f"schedule {schedule!r} runs one stage per rank; virtual_stages must be 1, got "
                         f"{virtual_stages}")
    m, v = microbatches, virtual_stages
    orders = []
    for r in range(pp):
        if schedule == "gpipe":
            orders.append([Action("F", r, i) for i in range(m)] + [Action("B", r, i) for i in range(m)])
            continue
        per_round = m // max(1, m // pp) if schedule == "interleaved" else pp
        chunks = v if schedule == "interleaved" else 1
        total = m * chunks
        warmup = min((chunks - 1) * per_round + (2 if schedule == "interleaved" else 1) * (pp - 1 - r), total)
        next_mb: dict[tuple[str, int], int] = {}

        def take(kind: str, chunk: int) -> Action:
            stage = chunk * pp + r
            mb = next_mb.get((kind, stage), 0)
            next_mb[(kind, stage)] = mb + 1
            return Action(kind, stage, mb)

        def forward_chunk(step: int) -> int:
            return (step // per_round) % chunks

        def backward_chunk(step: int) -> int:
            return chunks - 1 - ((step - warmup) // per_round) % chunks

        actions = [take("F", forward_chunk(j)) for j in range(warmup)]
        for j in range(warmup, total):
            actions += [take("F", forward_chunk(j)), take("B", backward_chunk(j))]
        actions += [take("B", backward_chunk(j)) for j in range(total, total + warmup)]
        orders.append(actions)
    return orders


def simulate(order: list[list[Action]], forward_s, backward_s, recompute_s, tail_s=None) -> list[Block]:
    """Lay ``order`` on a time axis: each action starts when its rank is free and its input exists.

    ``forward_s[k]``, ``backward_s[k]``, ``recompute_s[k]``: seconds of stage k's blocks for one microbatch;
    ``tail_s[r]``: ``(dp_sync_s, optimizer_s)`` of rank r, run after its last action. ``ValueError`` when the
    order waits on itself (not a valid pipeline schedule).

    Example:
        >>> blocks = simulate(schedule_order("gpipe", 2, 1), [1.0, 1.0], [2.0, 2.0], [0.0, 0.0])
        >>> [(b.rank, b.kind, b.start_s, b.end_s) for b in blocks]
        [(0, 'forward', 0.0, 1.0), (1, 'forward', 1.0, 2.0), (1, 'backward', 2.0, 4.0), (0, 'backward', 4.0, 6.0)]
    """
    num_stages = len(forward_s)
    done: dict[tuple[str, int, int], float] = {}
    clock = [0.0] * len(order)
    position = [0] * len(order)
    blocks: list[Block] = []
    remaining = sum(len(actions) for actions in order)
    while remaining:
        progressed = False
        for r, actions in enumerate(order):
            while position[r] < len(actions):
                a = actions[position[r]]
                if a.kind == "F":
                    needs = [("F", a.stage - 1, a.microbatch)] if a.stage > 0 else []
                else:
                    needs = [("F", a.stage, a.microbatch)]
                    if a.stage < num_stages - 1:
                        needs.append(("B", a.stage + 1, a.microbatch))
                if any(n not in done for n in needs):
                    break
                start = max([clock[r]] + [done[n] for n in needs])
                parts = ([("forward", forward_s[a.stage])] if a.kind == "F" else
                         [("recompute", recompute_s[a.stage])] * (recompute_s[a.stage] > 0)
                         + [("backward", backward_s[a.stage])])
                for kind, seconds in parts:
                    blocks.append(Block(r, kind, a.stage, a.microbatch, start, start + seconds))
                    start += seconds
                done[(a.kind, a.stage, a.microbatch)] = clock[r] = start
                position[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(actions[position[r]]) for r, actions in enumerate(order) if position[r] < len(actions)}
            raise ValueError(f"the pipeline order waits on itself: the next actions {stuck} all need work no rank "
                             f"has done yet")
    for r, (sync_s, optimizer_s) in enumerate(tail_s or []):
        blocks.append(Block(r, "dp_sync", None, None, clock[r], clock[r] + sync_s))
        blocks.append(Block(r, "optimizer", None, None, clock[r] + sync_s, clock[r] + sync_s + optimizer_s))
    return blocks


def timeline(plan) -> list[Block]:
    """The predicted blocks of one step of ``plan``, from ``plan.predicted`` (see the module docstring).

    ``ValueError`` when the plan holds no per-stage prediction (a plan made by hand, or saved before plans
    recorded one): re-plan with :func:`autoplan.plan` to get it.

    Example:
                >>> from autoplan.synthetic import pipeline_plan as small_plan
        >>> blocks = timeline(small_plan("1f1b"))
        >>> sorted({b.kind for b in blocks})
        ['backward', 'dp_sync', 'forward', 'optimizer', 'recompute']
    """
    p = plan.predicted
    if p is None or not p.stages or not p.ranks:
        what = "no prediction" if p is None else "no per-stage times"
        raise ValueError(f"the plan has {what} to draw a timeline from (it was written by hand or by an older "
                         f"autoplan); re-plan with autoplan.plan(...) or `autoplan plan ... --json` to record them")
    if len(p.stages) != len(plan.stages) or len(p.ranks) != plan.mesh.pp:
        raise ValueError(f"plan.predicted has {len(p.stages)} stage times and {len(p.ranks)} rank figures but the "
                         f"plan has {len(plan.stages)} stages on {plan.mesh.pp} pipeline ranks; re-plan")
    order = schedule_order(plan.schedule, plan.mesh.pp, plan.microbatches, plan.virtual_stages)
    return simulate(order, [s.forward_s + s.comm_s / 2 for s in p.stages],
                    [s.backward_s + s.comm_s / 2 for s in p.stages], [s.recompute_s for s in p.stages],
                    [(r.dp_sync_s, r.optimizer_s) for r in p.ranks])


def format_timeline(blocks: list[Block], width: int = 72, max_ranks: int = 16) -> list[str]:
    """One line per rank: each of ``width`` columns shows the kind that fills most of its share of the step
    (letters of :data:`BLOCK_KINDS`, ``·`` idle, :data:`ALTERNATING` where forwards and backwards take turns),
    then the time axis. Ranks beyond ``max_ranks``: the first and the last few.

    Example:
        >>> blocks = simulate(schedule_order("gpipe", 2, 1), [1.0, 1.0], [2.0, 2.0], [0.0, 0.0])
        >>> print("\\n".join(format_timeline(blocks, width=12)))
        rank 0  FF······BBBB
        rank 1  ··FFBBBB····
                0 s   6.00 s
    """
    from .explain import format_seconds

    end_s = max((b.end_s for b in blocks), default=0.0)
    ranks = sorted({b.rank for b in blocks})
    shown: list[int | None] = list(ranks)
    if len(ranks) > max_ranks:
        shown = ranks[: max_ranks - 4] + [None] + ranks[-3:]
    label = max(len(f"rank {r}") for r in ranks) if ranks else 6
    lines = []
    for r in shown:
        if r is None:
            lines.append(f"{'…':<{label}}  {len(ranks) - max_ranks + 1} more ranks")
            continue
        covered = [dict() for _ in range(width)]
        for b in blocks:
            if b.rank != r or b.duration_s <= 0:
                continue
            first = int(b.start_s / end_s * width)
            for col in range(first, min(width, int(b.end_s / end_s * width) + 1)):
                lo, hi = col * end_s / width, (col + 1) * end_s / width
                overlap = min(hi, b.end_s) - max(lo, b.start_s)
                if overlap > 0:
                    covered[col][b.kind] = covered[col].get(b.kind, 0.0) + overlap
        row = ""
        for col, kinds in enumerate(covered):
            column_s = end_s / width
            idle = column_s - sum(kinds.values())
            kind, seconds = max(kinds.items(), key=lambda kv: kv[1], default=(None, 0.0))
            if min(kinds.get("forward", 0.0), kinds.get("backward", 0.0)) >= column_s / 8:
                row += ALTERNATING  # 1F1B's steady state: a forward and a backward in turn within one column
            else:
                row += BLOCK_KINDS[kind] if kind is not None and seconds >= idle else "·"
        lines.append(f"{f'rank {r}':<{label}}  {row}")
    left, right = "0 s", format_seconds(end_s)
    lines.append(" " * (label + 2) + left + " " * max(1, width - len(left) - len(right)) + right)
    return lines
