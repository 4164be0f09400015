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
    "RECOMPUTE_MODES", "TP_STYLES", "SEQUENCE_PARALLEL_MODES", "MESH_AXES", "torch_dtype", "FUSED_COLWISE",
    "tp_style_kind", "fused_parts", "DTENSOR_SUFFIX", "keeps_dtensor",
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
#: Tensor-parallel styles a plan may assign to a module FQN (see docs/concepts.md); ``sequence`` marks a norm run on
#: its rank's share of the tokens under sequence parallelism (Korthikanti et al. 2022).
TP_STYLES = ("colwise", "rowwise", "vocab_embedding", "vocab_head", "sequence")
#: ``colwise:K``: a colwise projection that fuses K equal parts (``colwise:3`` for q, k, v in one ``qkv`` linear,
#: ``colwise:2`` for a fused gate/up): rank r of t holds output rows r of t of every part, [q_r; k_r; v_r].
FUSED_COLWISE = "colwise:"
#: ``colwise/dtensor``, ``colwise:K/dtensor``: the projection hands its output on as a DTensor of the global shape and
#: the module's code between the linears runs on DTensors (code that reshapes with sizes read from its input, as
#: nanoGPT's ``view(B, T, n_head, C // n_head)``); the rowwise linear takes that DTensor. See
#: :mod:`autoplan.execute.tp_dtensor`.
DTENSOR_SUFFIX = "/dtensor"


def keeps_dtensor(style: str) -> bool:
    """Whether a colwise style hands its output on as a global-shape DTensor (``…/dtensor``).

    Example:
        >>> keeps_dtensor("colwise:3/dtensor"), keeps_dtensor("colwise:3")
        (True, False)
    """
    return isinstance(style, str) and style.startswith("colwise") and style.endswith(DTENSOR_SUFFIX)


def _plain(style: str) -> str:
    return style[:-len(DTENSOR_SUFFIX)] if keeps_dtensor(style) else style


def tp_style_kind(style: str) -> str:
    """The plain style a plan style is a form of: ``colwise`` for ``colwise:K``, else the style itself (unknown
    names are returned as they are; the plan's validation names the known ones).

    Example:
        >>> tp_style_kind("colwise:3"), tp_style_kind("rowwise")
        ('colwise', 'rowwise')
    """
    return "colwise" if fused_parts(style) > 1 else _plain(style)


def fused_parts(style: str) -> int:
    """How many equal parts a ``colwise:K`` style's projection fuses (K ≥ 2); 1 for every other style.

    Example:
        >>> fused_parts("colwise:3"), fused_parts("colwise"), fused_parts("colwise:x")
        (3, 1, 1)
    """
    style = _plain(style)
    if isinstance(style, str) and style.startswith(FUSED_COLWISE) and style[len(FUSED_COLWISE):].isdigit():
        parts = int(style[len(FUSED_COLWISE):])
        return parts if parts >= 2 else 1
    return 1


#: What the user may ask of sequence parallelism: the planner decides, always where tp > 1, never.
SEQUENCE_PARALLEL_MODES = ("auto", True, False)
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
