"""What some modules take in, hand out and save when the model runs in a low precision: one fake forward per way
of running it (:func:`low_precision_pass`), no real compute.

The executor runs bf16 (and fp16) plans two ways (:func:`autoplan.mixed_precision.mixed_precision_mode`), and a
traced fp32 byte halved is right for neither everywhere:

- ``"autocast"``: ``torch.autocast`` runs matmuls in the low precision and leaves the rest in the weights'
  precision, so a residual stream that starts at an embedding (not autocast) stays fp32, and so do the pipeline
  boundaries, the tensor-parallel input gradients and the norms' saved inputs made of it, while a linear's output is
  bf16. CPU and CUDA autocast agree on what decides these dtypes: matmuls and linears in the low precision,
  embeddings and additions with a fp32 operand in fp32.
- ``"bf16_weights"``: FSDP2's and ``replicate``'s ``MixedPrecisionPolicy`` casts the parameters and the floating
  inputs (not the buffers), so everything is bf16 but what the model upcasts itself: transformers' RMSNorm keeps
  its normalised input in fp32 (a Llama decoder layer saves 9.5% more than its fp32 bytes halved), and CPU's SDPA
  math kernel, which dropout selects, computes its scores in fp32 whatever its inputs.

:mod:`autoplan.cost.layer_choice` prices each layout at its way's bytes
(:func:`autoplan.mixed_precision.low_precision_run`).

Example:
    >>> import torch
    >>> from autoplan.models import GPT, GPTConfig
    >>> ids = torch.randint(0, 256, (2, 16))
    >>> calls, saved = low_precision_pass(GPT(GPTConfig()), (ids,), {}, ["blocks.0", "blocks.0.mlp.proj"],
    ...                                   "autocast")
    >>> calls["blocks.0"], calls["blocks.0.mlp.proj"]   # (input, output): the block's stream fp32, a linear's bf16
    ((4096, 4096), (8192, 2048))
    >>> low_precision_pass(GPT(GPTConfig()), (ids,), {}, ["blocks.0"], "bf16_weights")[0]["blocks.0"]
    (2048, 2048)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Sequence

import torch

from ..graph import Layer, LowPrecisionBytes, TensorParallelGroup
from .chain import LayerLocator
from .measure import Measurement, measure

__all__ = ["RUNS", "LOW_PRECISION_DTYPE", "low_precision_pass", "with_low_precision_bytes",
           "without_low_precision_bytes", "as_bf16_weights_everywhere"]

#: The ways a low precision runs, as :class:`autoplan.graph.Layer` fields.
RUNS = ("autocast", "bf16_weights")

#: The low precision the passes run; fp16 casts the same tensors, so its bytes are the same.
LOW_PRECISION_DTYPE = torch.bfloat16


def low_precision_pass(model: torch.nn.Module, args: tuple, kwargs: dict, fqns: Iterable[str], run: str,
                       layers: Sequence[str] = ()) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    """The model run once forward the way ``run`` (one of :data:`RUNS`) runs it, on fake tensors (its own tensors
    are never touched), by :func:`autoplan.trace.measure.measure`: ({module FQN: (floating bytes passed in
    positionally, floating bytes returned)} of the first call of each of ``fqns``, a module the forward does not
    call left out; {layer name: bytes autograd saved in it} for the layer chain ``layers``, each storage counted
    once, where it was first saved, an op outside every layer in the layer it runs beside, the weights (and
    autocast's copies of them) excluded: as the plain trace counts a layer's activations).
    """
    if run not in RUNS:
        raise ValueError(f"unknown low-precision run {run!r}; use one of {', '.join(RUNS)}")
    dtypes = {"autocast_dtype" if run == "autocast" else "param_dtype": LOW_PRECISION_DTYPE}
    m = measure(model, args, kwargs, **dtypes)
    calls = {fqn: (m.calls[fqn].floating_input_bytes, m.calls[fqn].floating_output_bytes)
             for fqn in fqns if fqn in m.calls}
    saved = dict(zip(layers, LayerLocator(list(layers), m.calls).totals(m.saved, "nbytes"))) if layers else {}
    return calls, saved


def _scaled(traced_bytes: int, plain: int, low: int) -> int | None:
    """``traced_bytes`` at the low/plain ratio of one call's floating bytes; None where nothing was seen."""
    return round(traced_bytes * low / plain) if plain > 0 else None


def with_low_precision_bytes(layers: list[Layer], m: Measurement, model: torch.nn.Module, args: tuple,
                             kwargs: dict) -> list[Layer]:
    """``layers`` with what each of :data:`RUNS` makes of them: for each layer its output and what it saves for
    backward (located as the plain trace locates it), for each tensor-parallel group its last module's output (what
    forward all-reduces) and its first module's input (whose gradient backward all-reduces). A boundary is the
    traced figure at the ratio of the module's floating bytes in the run (:func:`low_precision_pass`) to the same
    call traced plain (``m``). A run this model cannot make keeps ``None`` (the precision's bytes are charged)."""
    by_order = lambda fqn: m.calls[fqn].order if fqn in m.calls else -1  # noqa: E731
    ends = {}  # (layer, group) index → the group's first and last module called
    for i, layer in enumerate(layers):
        for j, group in enumerate(layer.tp_groups):
            modules = sorted((f for f in group.styles if f in m.calls), key=by_order)
            if modules:
                ends[i, j] = (modules[0], modules[-1])
    names = [layer.name for layer in layers]
    wanted = set(names) | {f for first_last in ends.values() for f in first_last}
    for run in RUNS:
        try:
            seen, saved = low_precision_pass(model, args, kwargs, wanted, run, names)
        except Exception:  # noqa: BLE001 - the plain trace stands; this run's plans keep the precision's bytes
            continue
        layers = _with_run(layers, run, seen, saved, m, ends)
    return layers


def _with_run(layers: list[Layer], run: str, seen: dict[str, tuple[int, int]], saved: dict[str, int],
              m: Measurement, ends: dict[tuple[int, int], tuple[str, str]]) -> list[Layer]:
    def ratio_bytes(traced: int, fqn: str, which: int) -> int | None:
        if fqn not in seen or fqn not in m.calls:
            return None
        call = m.calls[fqn]
        return _scaled(traced, (call.floating_input_bytes, call.floating_output_bytes)[which], seen[fqn][which])

    def group_bytes(group: TensorParallelGroup, at: tuple[int, int]) -> TensorParallelGroup:
        if at not in ends:
            return group
        first, last = ends[at]
        return replace(group, **{run: LowPrecisionBytes(output_bytes=ratio_bytes(group.output_bytes, last, 1),
                                                         input_bytes=ratio_bytes(group.input_bytes, first, 0))})

    return [replace(layer, tp_groups=tuple(group_bytes(g, (i, j)) for j, g in enumerate(layer.tp_groups)),
                    **{run: LowPrecisionBytes(output_bytes=ratio_bytes(layer.output_bytes, layer.name, 1),
                                              activation_bytes=saved[layer.name])})
            for i, layer in enumerate(layers)]


def without_low_precision_bytes(layers: list[Layer]) -> list[Layer]:
    """``layers`` without what the low-precision passes saw: every layout priced at the precision's bytes (the
    traced ones halved for bf16), as for a hand-built graph.

    Example:
        >>> import torch, autoplan
        >>> from autoplan.models import GPT, GPTConfig
        >>> layers = autoplan.trace(GPT(GPTConfig()), torch.randint(0, 256, (2, 16))).layers
        >>> {(l.autocast, l.bf16_weights) for l in without_low_precision_bytes(layers)}
        {(None, None)}
    """
    cleared = dict.fromkeys(RUNS)
    return [replace(layer, **cleared, tp_groups=tuple(replace(g, **cleared) for g in layer.tp_groups))
            for layer in layers]


def as_bf16_weights_everywhere(layers: list[Layer]) -> list[Layer]:
    """``layers`` priced as bf16 weights run them whatever the layout (autocast's layouts too): for comparing with
    a system that keeps its residual stream in bf16 (Megatron-LM's bf16 mode).

    Example:
        >>> import torch, autoplan
        >>> from autoplan.models import GPT, GPTConfig
        >>> layers = autoplan.trace(GPT(GPTConfig()), torch.randint(0, 256, (2, 16))).layers
        >>> all(l.autocast == l.bf16_weights for l in as_bf16_weights_everywhere(layers))
        True
    """
    return [replace(layer, autocast=layer.bf16_weights,
                    tp_groups=tuple(replace(g, autocast=g.bf16_weights) for g in layer.tp_groups))
            for layer in layers]
