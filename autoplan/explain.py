"""Pure formatters: graphs, plans and explanations as strings. No torch import, no side effects.

Example:
    >>> from autoplan.explain import format_bytes
    >>> format_bytes(3 * 2**30)
    '3.00 GiB'
"""

from __future__ import annotations

__all__ = ["format_bytes", "format_flops", "format_seconds", "format_count", "format_graph_summary"]


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
            format_flops(layer.flops),
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
