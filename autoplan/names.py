"""Module and parameter names (FQNs): which module holds a name, and which names share one tensor.

The tracer, the cost model, the solver and the executor all ask "is this FQN inside that module" and "which
parameter names are one tied tensor"; both are answered here, once. The root module is the empty name ``""``
and holds every name.

Example:
    >>> in_module("blocks.0.attn.qkv", "blocks.0"), in_module("blocks.01", "blocks.0")
    (True, False)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["in_module", "owner_index", "tied_parameter_names"]


def in_module(fqn: str, module: str) -> bool:
    """Whether ``fqn`` is ``module`` itself or lies inside it (``module`` ``""`` is the root: always true).

    Example:
        >>> in_module("blocks.0", "blocks.0"), in_module("head", ""), in_module("blocks.0", "blocks.0.mlp")
        (True, True, False)
    """
    return module == "" or fqn == module or fqn.startswith(module + ".")


def owner_index(fqn: str, modules: Sequence[str]) -> int | None:
    """Index of the innermost of ``modules`` that holds ``fqn`` (the longest containing name), or ``None``.

    Example:
        >>> owner_index("blocks.1.mlp.fc.weight", ["tok", "blocks.0", "blocks.1", "head"])
        2
        >>> owner_index("lm_head.weight", ["tok", "blocks.0"]) is None
        True
    """
    best: int | None = None
    for i, module in enumerate(modules):
        if in_module(fqn, module) and (best is None or len(module) > len(modules[best])):
            best = i
    return best


def tied_holders(tied: Sequence[Sequence[str]], layers: Sequence[str]) -> list[tuple[str, list[int]]]:
    """Each tied weight (its first name) with the indices of the ``layers`` that hold one of its names.

    Example:
        >>> tied_holders([["tok.weight", "head.weight"]], ["tok", "blocks.0", "head"])
        [('tok.weight', [0, 2])]
    """
    out = []
    for names in tied:
        held = sorted({i for i in (owner_index(name.rpartition(".")[0], layers) for name in names) if i is not None})
        out.append((names[0], held))
    return out


def tied_parameter_names(module: "nn.Module") -> list[list[str]]:
    """Groups of parameter FQNs that name one tensor (two or more names each), in model order.

    Example:
        >>> from autoplan.models import GPT, GPTConfig
        >>> tied_parameter_names(GPT(GPTConfig()))
        [['tok.weight', 'head.weight']]
    """
    by_id: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]
