"""The words a plan is made of, each spelled once: precisions, optimizers, data-parallel kinds, schedules,
recompute modes and tensor-parallel styles. Every other module (options, plan JSON, cost model, CLI,
executor) takes its choices from here.

Example:
    >>> from autoplan.vocabulary import PRECISIONS, PRECISION_BYTES, SCHEDULES
    >>> PRECISIONS, PRECISION_BYTES["bf16"], SCHEDULES[-1]
    (('fp32', 'bf16', 'fp16'), 2, 'interleaved')
"""

from __future__ import annotations

__all__ = [
    "PRECISIONS", "PRECISION_BYTES", "LOW_PRECISIONS", "OPTIMIZERS", "DATA_PARALLEL_KINDS", "SCHEDULES",
    "RECOMPUTE_MODES", "TP_STYLES", "MESH_AXES", "torch_dtype",
]

#: Training precisions: fp32, or mixed precision with bf16/fp16 compute over fp32 master weights.
PRECISIONS = ("fp32", "bf16", "fp16")
#: Bytes per element of each precision's compute dtype.
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: The mixed-precision choices (what autocast / FSDP2's MixedPrecisionPolicy cast to).
LOW_PRECISIONS = ("bf16", "fp16")
#: Optimizers whose state bytes the cost model knows.
OPTIMIZERS = ("adamw", "sgd")
#: Data parallelism: replicated weights with gradient all-reduce, or fully sharded (ZeRO-3 / FSDP2).
DATA_PARALLEL_KINDS = ("ddp", "fsdp")
#: Pipeline schedules, as torch.distributed.pipelining runs them.
SCHEDULES = ("gpipe", "1f1b", "interleaved")
#: What the user may ask of recompute; a plan records the modules actually recomputed.
RECOMPUTE_MODES = ("auto", "none", "full", "selective")
#: Tensor-parallel styles a plan may assign to a module FQN (see docs/concepts.md).
TP_STYLES = ("colwise", "rowwise", "vocab_embedding", "vocab_head")
#: Mesh axes, outermost first (the rank layout: pp-major, tp innermost).
MESH_AXES = ("pp", "dp", "tp")


def torch_dtype(precision: str):
    """The torch dtype of a precision's compute (``torch.bfloat16`` for ``"bf16"``).

    Example:
        >>> torch_dtype("bf16")
        torch.bfloat16
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
