"""What some modules take in and hand out when the model runs under autocast: one fake forward in
``torch.autocast(bfloat16)``, no real compute.

Autocast runs matmuls in the low precision and leaves the rest in the weights' precision: a residual stream that
starts at an embedding (not autocast) stays fp32, and so do the pipeline boundaries and tensor-parallel input
gradients made of it, while a linear's output is bf16. The cost model halves traced fp32 bytes for a bf16 plan,
which is what FSDP2's and ``replicate``'s mixed precision (bf16 weights, so bf16 everywhere) run; under autocast
(:func:`autoplan.plan.mixed_precision_mode`) it prices these tensors at what this pass reads instead. CPU autocast
and CUDA autocast agree on what decides these dtypes: matmuls and linears in the low precision, embeddings and
additions with a fp32 operand in fp32.

Example:
    >>> import torch
    >>> from autoplan.models import GPT, GPTConfig
    >>> ids = torch.randint(0, 256, (2, 16))
    >>> calls, saved = autocast_pass(GPT(GPTConfig()), (ids,), {}, ["blocks.0", "blocks.0.mlp.proj"])
    >>> calls["blocks.0"], calls["blocks.0.mlp.proj"]   # (input, output): the block's stream fp32, a linear's bf16
    ((4096, 4096), (8192, 2048))
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

import torch

from ..graph import Layer, TensorParallelGroup
from .measure import Measurement, measure, per_module

__all__ = ["autocast_pass", "with_autocast_bytes", "without_autocast_bytes", "AUTOCAST_DTYPE"]

#: The low precision the pass runs; fp16 autocast casts the same ops, so its bytes are the same.
AUTOCAST_DTYPE = torch.bfloat16


def autocast_pass(model: torch.nn.Module, args: tuple, kwargs: dict,
                  fqns: Iterable[str]) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    """The model run once forward under CPU autocast on fake tensors (its own tensors are never touched), by
    :func:`autoplan.trace.measure.measure`: ({module FQN: (floating bytes passed in positionally, floating bytes
    returned)} of the first call of each of ``fqns``, a module the forward does not call left out; {module FQN:
    bytes autograd saved while it ran, its children's included}), each storage counted once, where it was first
    saved, the weights and autocast's copies of them excluded, as the plain run counts them.
    """
    m = measure(model, args, kwargs, autocast_dtype=AUTOCAST_DTYPE)
    calls = {fqn: (m.calls[fqn].floating_input_bytes, m.calls[fqn].floating_output_bytes)
             for fqn in fqns if fqn in m.calls}
    return calls, per_module(m)[1]


def _scaled(traced_bytes: int, plain: int, autocast: int) -> int | None:
    """``traced_bytes`` at the autocast/plain ratio of one call's floating bytes; None where nothing was seen."""
    return round(traced_bytes * autocast / plain) if plain > 0 else None


def with_autocast_bytes(layers: list[Layer], m: Measurement, module_saved: dict[str, int], model: torch.nn.Module,
                        args: tuple, kwargs: dict) -> list[Layer]:
    """``layers`` with what autocast makes of them: each layer's ``autocast_output_bytes`` (its output) and
    ``autocast_activation_bytes`` (what it saves for backward), each group's ``autocast_output_bytes`` (its last
    module's output, what forward all-reduces) and ``autocast_input_bytes`` (its first module's input, whose
    gradient backward all-reduces). Each is the traced figure at the ratio of the module's bytes under autocast
    (:func:`autocast_pass`) to the same call traced plain (``m``; ``module_saved``: the plain run's saved bytes per
    module, children included). A model this pass cannot run keeps ``None`` (the precision's bytes are
    charged)."""
    by_order = lambda fqn: m.calls[fqn].order if fqn in m.calls else -1  # noqa: E731
    ends = {}
    for layer in layers:
        for group in layer.tp_groups:
            modules = sorted((f for f in group.styles if f in m.calls), key=by_order)
            if modules:
                ends[id(group)] = (modules[0], modules[-1])
    wanted = {layer.name for layer in layers} | {f for first_last in ends.values() for f in first_last}
    try:
        seen, saved = autocast_pass(model, args, kwargs, wanted)
    except Exception:  # noqa: BLE001 - the plain trace stands; autocast plans keep the precision's bytes
        return layers

    def ratio_bytes(traced: int, fqn: str, which: int) -> int | None:
        if fqn not in seen or fqn not in m.calls:
            return None
        call = m.calls[fqn]
        return _scaled(traced, (call.floating_input_bytes, call.floating_output_bytes)[which], seen[fqn][which])

    def group_bytes(group: TensorParallelGroup) -> TensorParallelGroup:
        if id(group) not in ends:
            return group
        first, last = ends[id(group)]
        return replace(group, autocast_output_bytes=ratio_bytes(group.output_bytes, last, 1),
                       autocast_input_bytes=ratio_bytes(group.input_bytes, first, 0))

    return [replace(layer, autocast_output_bytes=ratio_bytes(layer.output_bytes, layer.name, 1),
                    autocast_activation_bytes=_scaled(layer.activation_bytes, module_saved.get(layer.name, 0),
                                                      saved.get(layer.name, 0)),
                    tp_groups=tuple(group_bytes(g) for g in layer.tp_groups)) for layer in layers]


def without_autocast_bytes(layers: list[Layer]) -> list[Layer]:
    """``layers`` priced as bf16 weights run them (every tensor in the low precision: the precision's bytes),
    whatever the layout: for comparing with a system that keeps its residual stream in bf16 (Megatron-LM's bf16
    mode), or a model the autocast pass could not run.

    Example:
        >>> import torch, autoplan
        >>> from autoplan.models import GPT, GPTConfig
        >>> layers = autoplan.trace(GPT(GPTConfig()), torch.randint(0, 256, (2, 16))).layers
        >>> {(l.autocast_output_bytes, l.autocast_activation_bytes) for l in without_autocast_bytes(layers)}
        {(None, None)}
    """
    return [replace(layer, autocast_output_bytes=None, autocast_activation_bytes=None, tp_groups=tuple(
        replace(g, autocast_output_bytes=None, autocast_input_bytes=None) for g in layer.tp_groups))
        for layer in layers]
