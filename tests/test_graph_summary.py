"""format_graph_summary on a hand-built ModelGraph: a pure formatter, no tracing."""

from __future__ import annotations

import networkx as nx
import pytest

from autoplan.explain import format_graph_summary
from autoplan.graph import Layer, ModelGraph


def _graph() -> ModelGraph:
    layers = [
        Layer("tok", 0, "Embedding:1", 0, 0, 1_000_000, 4_000_000, 2048, 3 * 2**20),
        Layer("blocks.0", 1, "Block:2", 5 * 10**12, 10**13, 12_000_000, 48_000_000, 5 * 2**30, 3 * 2**20),
        Layer("head", 2, "Linear:3", 2 * 10**9, 4 * 10**9, 0, 0, 2**20, 2**30),
    ]
    return ModelGraph("Toy", layers, nx.DiGraph(), batch_size=8, dtype_bytes=4, num_params=13_000_000,
                      forward_flops=5_002_000_000_000, backward_flops=10**13, input_bytes=2048, fingerprint="f",
                      method="export", trace_s=0.25)


def test_summary_rows_units_and_totals():
    lines = format_graph_summary(_graph()).splitlines()
    assert lines[0] == "Toy: 13.00M params, 3 layers, batch 8, traced by export in 250.0 ms"
    assert lines[1].split() == ["#", "layer", "kind", "params", "fwd", "FLOPs", "activations", "boundary"]
    assert lines[3].split() == ["0", "tok", "Embedding", "1.00M", "0", "FLOP", "2.00", "KiB", "3.00", "MiB"]
    assert lines[4].split() == ["1", "blocks.0", "Block", "12.00M", "5.00", "TFLOP", "5.00", "GiB", "3.00", "MiB"]
    assert lines[5].split()[-4:] == ["1.00", "MiB", "1.00", "GiB"]
    assert lines[-1].split() == ["total", "13.00M", "5.00", "TFLOP", "5.00", "GiB"]
    assert len({len(line) for line in lines[1:]}) == 1  # aligned columns


def test_summary_is_what_str_and_summary_print():
    graph = _graph()
    assert str(graph) == graph.summary() == format_graph_summary(graph)


def test_layer_lookup_names_the_known_layers():
    with pytest.raises(KeyError, match="blocks.0"):
        _graph().layer("blocks.9")
