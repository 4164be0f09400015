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
    "RECOMPUTE_MODES", "FSDP_RESHARD_MODES", "TP_STYLES", "SEQUENCE_PARALLEL_MODES", "MESH_AXES", "torch_dtype", "FUSED_COLWISE",
    "tp_style_kind", "fused_parts", "fused_sizes", "part_sizes", "DTENSOR_SUFFIX", "keeps_dtensor",
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
#: How FSDP treats its gathered weights between the microbatches of a step (``Plan.fsdp_reshard``): ``"step"``
#: keeps them from the first forward to the last backward when there are several microbatches or a pipeline
#: (ZeRO-2-style accumulation: one all-gather and one reduce-scatter per unit and step); ``"microbatch"``
#: reshards after every forward and backward and reduce-scatters every microbatch's gradients (ZeRO-3 with gradient
#: accumulation: 2·m all-gathers and m reduce-scatters per unit, one unit's weights gathered at a time).
FSDP_RESHARD_MODES = ("step", "microbatch")
#: Tensor-parallel styles a plan may assign to a module FQN (see docs/concepts.md); ``sequence`` marks a norm run on
#: its rank's share of the tokens under sequence parallelism (Korthikanti et al. 2022).
TP_STYLES = ("colwise", "rowwise", "vocab_embedding", "vocab_head", "sequence")
#: ``colwise:K``: a colwise projection that fuses K equal parts (``colwise:3`` for q, k, v in one ``qkv`` linear,
#: ``colwise:2`` for a fused gate/up): rank r of t holds output rows r of t of every part, [q_r; k_r; v_r].
#: ``colwise:a+b+c``: the same for parts of unequal sizes, given in output features (Phi-3's ``qkv_proj`` with grouped
#: key/value heads: ``colwise:512+128+128``); rank r computes with rows r of t of every part.
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
    """How many parts a ``colwise:K`` (K equal parts, K ≥ 2) or ``colwise:a+b+c`` style's projection fuses; 1 for
    every other style.

    Example:
        >>> fused_parts("colwise:3"), fused_parts("colwise:8+4+4"), fused_parts("colwise"), fused_parts("colwise:x")
        (3, 3, 1, 1)
    """
    sizes = fused_sizes(style)
    if sizes is not None:
        return len(sizes)
    style = _plain(style)
    if isinstance(style, str) and style.startswith(FUSED_COLWISE) and style[len(FUSED_COLWISE):].isdigit():
        parts = int(style[len(FUSED_COLWISE):])
        return parts if parts >= 2 else 1
    return 1


def fused_sizes(style: str) -> tuple[int, ...] | None:
    """The part sizes (output features) of a ``colwise:a+b+c`` style, at least two positive ones; ``None`` for every
    other style (``colwise:K`` parts are equal: :func:`part_sizes` gives them for a projection's width).

    Example:
        >>> fused_sizes("colwise:8+4+4"), fused_sizes("colwise:3"), fused_sizes("colwise:8+")
        ((8, 4, 4), None, None)
    """
    style = _plain(style)
    if not (isinstance(style, str) and style.startswith(FUSED_COLWISE) and "+" in style):
        return None
    fields = style[len(FUSED_COLWISE):].split("+")
    if not all(f.isdigit() and int(f) > 0 for f in fields):
        return None
    return tuple(int(f) for f in fields)


def part_sizes(style: str, features: int) -> tuple[int, ...]:
    """The sizes of the parts a colwise style cuts a projection's ``features`` output features into, each split over
    the tp ranks on its own: the given ones (``colwise:a+b+c``), K equal ones (``colwise:K``), or one.

    Example:
        >>> part_sizes("colwise:3", 24), part_sizes("colwise:8+4+4", 16), part_sizes("colwise", 16)
        ((8, 8, 8), (8, 4, 4), (16,))
    """
    sizes = fused_sizes(style)
    if sizes is not None:
        return sizes
    return (features // fused_parts(style),) * fused_parts(style)


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
