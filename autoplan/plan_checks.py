"""Consistency checks of a :class:`autoplan.Plan`'s tensor-parallel styles: Megatron pairs complete, and sequence
parallelism only where it can split a layer's residual stream and is priced. Each failure is a ``ValueError``
naming the entries and the fix.

Example:
    >>> from autoplan.plan_checks import check_tp_pairs
    >>> check_tp_pairs({"blocks.0.mlp.fc": "colwise", "blocks.0.mlp.proj": "rowwise"})
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .vocabulary import tp_style_kind

if TYPE_CHECKING:  # pragma: no cover
    from .plan import Plan

__all__ = ["check", "check_tp_pairs", "check_sequence_parallel"]


def check(condition: bool, message: str) -> None:
    """A ``ValueError`` with ``message`` unless ``condition``.

    Example:
        >>> check(1 + 1 == 2, "arithmetic")
    """
    if not condition:
        raise ValueError(message)


def _pair_scopes(fqn: str) -> tuple[str, ...]:
    """Where a colwise linear's rowwise partner may sit: under its parent module (``attn.qkv`` → ``attn.proj``)
    or its grandparent (BERT's ``attention.self.query`` → ``attention.output.dense``), as the trace pairs them."""
    parent = fqn.rpartition(".")[0]
    return (parent, parent.rpartition(".")[0]) if parent else (parent,)


def _ancestors(fqn: str) -> list[str]:
    """The root ``""`` and every module above ``fqn`` (``a.b.c`` → ``""``, ``a``, ``a.b``)."""
    parts = fqn.split(".")
    return [""] + [".".join(parts[:k]) for k in range(1, len(parts))]


def check_tp_pairs(styles: dict[str, str]) -> None:
    """A colwise linear leaves its output split over the tp ranks and only a rowwise linear joins it again
    (Megatron's pair); a rowwise linear expects split inputs. One without the other hands a shard to code that
    expects the whole tensor (or the reverse), so every colwise needs a rowwise partner nearby and vice versa.

    Example:
        >>> check_tp_pairs({"attn.qkv": "colwise:3", "attn.proj": "rowwise"})
        >>> check_tp_pairs({"mlp.fc": "colwise"})
        Traceback (most recent call last):
        ...
        ValueError: tensor_parallel gives ['mlp.fc'] the style 'colwise' but no 'rowwise' module sits beside it: a colwise linear needs its rowwise partner in the same parent module or one level up (e.g. attn.qkv colwise with attn.proj rowwise); add the partner or drop the style
    """
    cols = [f for f, s in styles.items() if tp_style_kind(s) == "colwise"]
    rows = [f for f, s in styles.items() if s == "rowwise"]
    # under(r, scope) holds for the root and every proper ancestor of r: sets of those, not a scan of every
    # pair (a 96-block model has ~200 of each)
    row_scopes = {scope for r in rows for scope in _ancestors(r)}
    col_scopes = {scope for c in cols for scope in _pair_scopes(c)}
    lone_cols = [c for c in cols if not any(scope in row_scopes for scope in _pair_scopes(c))]
    lone_rows = [r for r in rows if not any(scope in col_scopes for scope in _ancestors(r))]
    for lone, have, want in ((lone_cols, "colwise", "rowwise"), (lone_rows, "rowwise", "colwise")):
        if lone:
            raise ValueError(
                f"tensor_parallel gives {sorted(lone)[:4]} the style {have!r} but no {want!r} module sits beside "
                f"{'it' if len(lone) == 1 else 'them'}: a {have} linear needs its {want} partner in the same parent "
                f"module or one level up (e.g. attn.qkv colwise with attn.proj rowwise); add the partner or drop "
                f"the style"
            )


def check_sequence_parallel(plan: "Plan") -> None:
    """Sequence parallelism shards the residual stream of the layers that hold ``sequence``-style modules (their
    norms); each such layer must be a plan layer with Megatron pairs inside, below the root. Under a pipeline the
    runs of such layers are cut at the stage boundaries: each stage splits the stream where its run starts and
    gathers it where the run ends, so stages exchange whole activations (:mod:`autoplan.execute.tensor_parallel`).
    Its pairs must be plain colwise and rowwise linears, the only ones sequence parallelism is priced on
    (:func:`_check_plain_pairs`).

    Example:
        >>> import autoplan
        >>> check_sequence_parallel(autoplan.Plan.example())  # off, and no 'sequence' styles
    """
    norms = [f for f, s in plan.tensor_parallel.items() if s == "sequence"]
    check(isinstance(plan.sequence_parallel, bool),
           f"sequence_parallel must be true or false, got {plan.sequence_parallel!r}")
    if not plan.sequence_parallel:
        check(not norms, f"tensor_parallel gives {norms[:3]} the style 'sequence' but sequence_parallel is off; "
                          f"set sequence_parallel true or drop those entries")
        return
    check(plan.mesh.tp > 1, "sequence_parallel needs mesh.tp > 1: it shards activations over the tensor-parallel "
                             "ranks")
    check(bool(norms), "sequence_parallel is on but no module has the style 'sequence': list the norms of each "
                        "sequence-parallel layer (e.g. 'blocks.0.ln1': 'sequence')")
    for fqn in norms:
        layer = next((l for l in plan.layers if l and fqn.startswith(l + ".")), None)
        check(layer is not None, f"tensor_parallel[{fqn!r}] = 'sequence' must lie strictly inside one of the plan's "
                                  f"layers (below the root): its layer's input is what sequence parallelism splits")
        inside = {tp_style_kind(s) for f, s in plan.tensor_parallel.items() if f.startswith(layer + ".")}
        check({"colwise", "rowwise"} <= inside and not inside & {"vocab_embedding", "vocab_head"},
               f"sequence-parallel layer {layer!r} (it holds {fqn!r}) needs colwise and rowwise linears inside and "
               f"no vocabulary-parallel module; its styles are {sorted(inside)}")
        _check_plain_pairs(plan.tensor_parallel, layer)


def _check_plain_pairs(styles: dict[str, str], layer: str) -> None:
    """A sequence-parallel layer's pairs must be plain ``colwise`` → ``rowwise`` linears: the trace offers sequence
    parallelism only there (``Layer.sequence_parallel``), so the cost model has no split-stream price for a layer
    holding another colwise form (a fused projection, ``colwise:K`` or ``colwise:a+b+c``, or a ``…/dtensor`` one)
    and would price it as plain tensor parallelism, while the executor splits and gathers its stream all the same.

    Example:
        >>> _check_plain_pairs({"b.ln": "sequence", "b.attn.qkv": "colwise:8+4+4", "b.attn.o": "rowwise"}, "b")
        Traceback (most recent call last):
        ...
        ValueError: sequence-parallel layer 'b' holds 'b.attn.qkv' with the style 'colwise:8+4+4', not a plain colwise or rowwise linear: sequence parallelism is priced only on layers whose pairs are plain colwise and rowwise linears (the only ones the planner offers it on), so this plan would run 'b' sequence-parallel but be priced without it; set sequence_parallel false, or drop the 'sequence' styles of 'b' (['b.ln']) to run that layer with plain tensor parallelism
    """
    inside = {f: s for f, s in styles.items() if f.startswith(layer + ".")}
    other = sorted(f for f, s in inside.items() if s not in ("colwise", "rowwise", "sequence"))
    if other:
        norms = sorted(f for f, s in inside.items() if s == "sequence")
        raise ValueError(
            f"sequence-parallel layer {layer!r} holds {other[0]!r} with the style {inside[other[0]]!r}, not a plain "
            f"colwise or rowwise linear: sequence parallelism is priced only on layers whose pairs are plain colwise "
            f"and rowwise linears (the only ones the planner offers it on), so this plan would run {layer!r} "
            f"sequence-parallel but be priced without it; set sequence_parallel false, or drop the 'sequence' styles "
            f"of {layer!r} ({norms}) to run that layer with plain tensor parallelism")
