"""Pure formatters: graphs, plans and explanations as strings. No torch import, no side effects.

Example:
    >>> from autoplan.explain import format_bytes
    >>> format_bytes(3 * 2**30)
    '3.00 GiB'
"""

from __future__ import annotations

__all__ = ["format_bytes", "format_flops", "format_seconds", "format_count", "format_graph_summary", "compress_names",
           "format_plan", "explain_plan"]


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
    """``format_seconds(0.0123) == '12.3 ms'``; an exact zero is ``'0 s'`` (nothing, not a rounded tiny time)."""
    if s == 0:
        return "0 s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.1f} µs"


def format_graph_summary(graph) -> str:
    """A traced model as a table: layer, kind, params, forward FLOPs, activation bytes, boundary bytes, totals.

    Figures are for the example batch the model was traced with.

    Example:
        >>> import torch, autoplan
        >>> g = autoplan.trace(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()), torch.randn(4, 8))
        >>> format_graph_summary(g).splitlines()[0].split(",")[:2]
        ['Sequential: 144 params', ' 2 layers']
    """
    header = ("#", "layer", "kind", "params", "fwd FLOPs", "activations", "boundary")
    rows = [
        (
            str(layer.index),
            layer.name or "(root)",
            layer.kind.split(":")[0],
            format_count(layer.num_params),
            format_flops(layer.forward_flops),
            format_bytes(layer.activation_bytes),
            format_bytes(layer.output_bytes),
        )
        for layer in graph.layers
    ]
    totals = (
        "",
        "total",
        "",
        format_count(graph.num_params),
        format_flops(graph.forward_flops),
        format_bytes(sum(layer.activation_bytes for layer in graph.layers)),
        "",
    )
    widths = [max(len(r[i]) for r in [header, *rows, totals]) for i in range(len(header))]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i in (1, 2) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(header))
    title = (
        f"{graph.model_name}: {format_count(graph.num_params)} params, {len(graph.layers)} layers, "
        f"batch {graph.batch_size}, traced by {graph.method} in {format_seconds(graph.trace_s)}"
    )
    return "\n".join([title, line(header), rule, *(line(r) for r in rows), rule, line(totals)])


# -- plans ------------------------------------------------------------------------------------------------------

_MAX_STAGE_ROWS = 12


def _split_index(name: str) -> tuple[str, int, str] | None:
    """``blocks.7.attn`` → ("blocks.", 7, ".attn"): the last numbered component and what surrounds it."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].isdigit():
            tail = ".".join(parts[i + 1:])
            return ".".join(parts[:i]) + ".", int(parts[i]), ("." + tail if tail else "")
    return None


def compress_names(names) -> str:
    """Module names with consecutive numbered runs folded: ``tok, blocks.0–blocks.23, head``.

    Example:
        >>> compress_names(["tok", "blocks.0", "blocks.1", "blocks.2", "head"])
        'tok, blocks.0–blocks.2, head'
        >>> compress_names(["blocks.3.attn", "blocks.4.attn", "blocks.5.attn"])
        'blocks.3.attn–blocks.5.attn'
    """
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if len(run) > 2:
            out.append(f"{run[0]}–{run[-1]}")
        else:
            out.extend(run)
        run.clear()

    for name in names:
        if run:
            prev, cur = _split_index(run[-1]), _split_index(name)
            if prev and cur and (prev[0], prev[2]) == (cur[0], cur[2]) and cur[1] == prev[1] + 1:
                run.append(name)
                continue
            flush()
        run.append(name)
    flush()
    return ", ".join(out)


def _bar(fraction: float, width: int = 20) -> str:
    filled = max(0, min(width, round(fraction * width)))
    return "█" * filled + "·" * (width - filled)


def _table(rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def _stage_rows(plan) -> list[tuple[str, ...]]:
    rows = [("stage", "rank", "layers", "recompute")]
    stages = list(enumerate(plan.stages))
    shown = stages if len(stages) <= _MAX_STAGE_ROWS else stages[:8] + [None] + stages[-3:]
    for item in shown:
        if item is None:
            rows.append(("…", "", f"{len(stages) - 11} more stages", ""))
            continue
        k, stage = item
        recompute = compress_names(stage.recompute) if stage.recompute else "—"
        rows.append((str(k), str(k % plan.mesh.pp), f"{compress_names(stage.layers)} ({len(stage.layers)})",
                     recompute))
    return rows


def _rank_peaks(plan) -> list[int]:
    """Peak bytes per pipeline rank from ``predicted.peak_memory_bytes`` (one entry per stage; stage k runs on
    rank k mod pp, so a rank's figure is the largest of its stages'; a list of one entry per rank reads the
    same)."""
    pp, peaks = plan.mesh.pp, plan.predicted.peak_memory_bytes
    return [max((b for k, b in enumerate(peaks) if k % pp == r), default=0) for r in range(min(pp, len(peaks)))]


def _recompute_why(plan) -> str:
    """What the recompute line of the cost split stands for, and why it is 0 when modules are recomputed."""
    n = len(plan.recompute)
    modules = f"{n} recomputed module{'' if n == 1 else 's'}"
    if n == 0:
        return "extra forwards on the slowest rank (no module is recomputed)"
    if plan.predicted.recompute_s != 0:
        return f"extra forwards on the slowest rank ({modules} in all)"
    ranks = sorted({k % plan.mesh.pp for k, stage in enumerate(plan.stages) if stage.recompute})
    if plan.mesh.pp == 1:
        return f"the {modules} {'adds' if n == 1 else 'add'} no forward FLOPs the cost model counts"
    where = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
    return (f"off the critical path: the {modules} {'runs' if n == 1 else 'run'} on {where}, not the slowest "
            f"rank (they buy memory there)")


def format_plan(plan) -> str:
    """A plan as a table readable in ten seconds: model, cluster, mesh, schedule, stages, memory, time.

    Example:
        >>> import autoplan
        >>> print(format_plan(autoplan.Plan.example()).splitlines()[0])
        Example (0 params) on 1 × cpu (1 node × 1)
    """
    c, m, p = plan.cluster, plan.mesh, plan.predicted
    nodes = f"{c.nodes} node{'s' if c.nodes != 1 else ''} × {c.devices_per_node}"
    lines = [f"{plan.model.name} ({format_count(plan.model.num_params)} params) on {c.world_size} × "
             f"{c.device.name} ({nodes})"]
    schedule = plan.schedule + (f", {plan.virtual_stages} virtual stages per rank" if plan.virtual_stages > 1 else "")
    tp_styles: dict[str, int] = {}
    for style in plan.tensor_parallel.values():
        tp_styles[style] = tp_styles.get(style, 0) + 1
    tp_text = ", ".join(f"{n} {style}" for style, n in sorted(tp_styles.items())) or "none"
    lines += _table([
        ("mesh", f"pp{m.pp} × dp{m.dp} × tp{m.tp}  (pipeline × data × tensor)"),
        ("schedule", f"{schedule}; {plan.microbatches} microbatch{'' if plan.microbatches == 1 else 'es'} of "
                     f"{plan.microbatch_size} (global batch {plan.global_batch_size})"),
        ("data parallel", f"{plan.data_parallel.upper()}, {plan.precision}, {plan.optimizer}"
                          f"{_fsdp_reshard_text(plan)}"),
        ("tensor parallel", f"{len(plan.tensor_parallel)} modules ({tp_text})" if plan.tensor_parallel else "none"),
    ] + ([("expert parallel", f"experts sharded over the {plan.expert_parallel} dp ranks")]
         if plan.expert_parallel > 1 else []))
    lines.append("")
    lines += _table(_stage_rows(plan))
    if p is not None:
        capacity = c.device.usable_memory_bytes
        lines.append("")
        lines.append(f"memory per device (usable {format_bytes(capacity)})")
        per_rank = _rank_peaks(plan)
        many = len(plan.stages) > m.pp
        mem_rows = [(f"rank {r}" + (f" (stages {', '.join(map(str, range(r, len(plan.stages), m.pp)))})"
                                    if many else ""),
                     format_bytes(b), _bar(b / capacity), f"{100 * b / capacity:.0f}%")
                    for r, b in enumerate(per_rank)]
        if len(mem_rows) > _MAX_STAGE_ROWS:
            worst = max(range(len(mem_rows)), key=lambda r: (per_rank[r], -r))
            mem_rows = mem_rows[:4] + [("…", "", "", "")] + mem_rows[-2:] + [(f"worst: rank {worst}",) +
                                                                             mem_rows[worst][1:]]
        lines += ["  " + x for x in _table(mem_rows, right=(1, 3))]
        lines.append("")
        lines.append(f"predicted step  {format_seconds(p.step_time_s)} = compute {format_seconds(p.compute_s)} + "
                     f"comm {format_seconds(p.comm_s)} + bubble {format_seconds(p.bubble_s)} + recompute "
                     f"{format_seconds(p.recompute_s)} + optimizer {format_seconds(p.optimizer_s)}")
        throughput = f"{p.samples_per_s:,.1f} samples/s ({p.samples_per_s / c.world_size:,.3g} per device)"
        tokens = getattr(plan.model, "tokens_per_sample", None)
        if tokens:
            throughput += f", {p.samples_per_s * tokens:,.0f} tokens/s"
        lines.append(f"throughput      {throughput}")
    s = plan.search
    gap = f", gap {100 * s.gap:.2f}%" if s.status == "FEASIBLE" and s.gap else ""
    if s.candidates == 0:
        lines.append("search          none (a plan written by hand)")
        return "\n".join(lines)
    lines.append(f"search          {s.solver} {s.status}{gap} in {format_seconds(s.wall_s)} over {s.candidates:,} "
                 f"candidate strategies")
    return "\n".join(lines)


def _timeline_lines(plan) -> list[str]:
    """The predicted timeline, one line per pipeline rank (nothing for a plan without per-stage figures)."""
    from .timeline import ALTERNATING, BLOCK_KINDS, format_timeline, timeline

    if not (plan.predicted.stages and plan.predicted.ranks):
        return []
    letters = {"forward": "forward", "recompute": "recompute", "backward": "backward", "dp_sync": "data-parallel sync",
               "optimizer": "optimizer"}
    legend = ", ".join(f"{BLOCK_KINDS[k]} {name}" for k, name in letters.items())
    return ["", "Timeline of one step, one line per pipeline rank:",
            *("  " + line for line in format_timeline(timeline(plan))),
            f"  {legend},", f"  {ALTERNATING} forward and backward in turn, · idle (pipeline bubble)"]


def _fsdp_reshard_text(plan) -> str:
    """How FSDP treats its gathered weights between microbatches, where that is a choice (several microbatches,
    dp > 1): kept through the step, or resharded every microbatch (``Plan.fsdp_reshard``)."""
    if plan.data_parallel != "fsdp" or plan.mesh.dp == 1 or (plan.microbatches == 1 and plan.mesh.pp == 1):
        return ""
    if plan.fsdp_keeps_weights:
        return "; gathered weights kept through the step (1 all-gather + 1 reduce-scatter per unit and step)"
    return ("; resharded every microbatch (ZeRO-3: 2 all-gathers + 1 reduce-scatter per unit and microbatch, "
            "one unit's weights gathered at a time)")


def explain_plan(plan) -> str:
    """Why this plan: its cost split, then the best alternatives the search weighed and why each lost.

    Example:
        >>> import autoplan
        >>> "no prediction" in explain_plan(autoplan.Plan.example())
        True
    """
    m, p = plan.mesh, plan.predicted
    v = f" v={plan.virtual_stages}" if plan.virtual_stages > 1 else ""
    label = (f"pp{m.pp}×dp{m.dp}×tp{m.tp} {plan.schedule}{v} mb={plan.microbatch_size}×{plan.microbatches} "
             f"{plan.data_parallel}{' reshard/mb' if plan.fsdp_reshard == 'microbatch' else ''}")
    if p is None:
        return f"{label}: no prediction recorded (plan made by hand); run autoplan.plan() to compare layouts"
    lines = [f"Chosen: {label}, predicted {format_seconds(p.step_time_s)} per step "
             f"({p.samples_per_s:,.1f} samples/s)"]
    parts = [("compute", p.compute_s, "forward + backward on the slowest pipeline rank, all microbatches"),
             ("comm", p.comm_s, "tensor-parallel collectives, pipeline sends, data-parallel gradient sync"),
             ("bubble", p.bubble_s, f"pipeline fill and drain: pp − 1 = {m.pp - 1} × the slowest stage's "
                                    f"microbatch"),
             ("recompute", p.recompute_s, _recompute_why(plan)),
             ("optimizer", p.optimizer_s, "the optimizer step after the last backward")]
    rows = [(f"  {name}", format_seconds(sec), f"{100 * sec / p.step_time_s:5.1f}%" if p.step_time_s else "",
             why) for name, sec, why in parts]
    lines.append("Cost split (nothing overlaps; the parts add up to the step):")
    lines += _table(rows, right=(1, 2))
    lines += _timeline_lines(plan)
    if plan.search.notes:
        lines.append("")
        lines.append("Notes:")
        lines += [f"  {note}" for note in plan.search.notes]
    alts = plan.search.alternatives
    if alts:
        lines.append("")
        lines.append("Alternatives (the best layout found of each, and why it lost):")
        rows = [(f"  {a.description}", format_seconds(a.step_time_s) if a.step_time_s is not None else "does not fit",
                 a.reason) for a in alts]
        lines += _table(rows, right=(1,))
    return "\n".join(lines)

