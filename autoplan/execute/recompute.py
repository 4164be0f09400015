"""Activation recomputation: the listed modules keep only their inputs for backward and run forward again.

The module's ``forward`` is replaced on the instance by a non-reentrant ``torch.utils.checkpoint`` call, so module
FQNs (and so state-dict keys, tensor-parallel and FSDP names) stay exactly as in the original model, and forward
hooks installed by tensor parallelism or FSDP keep running outside the recomputed region, as with torch's
``checkpoint_wrapper``. Applied after pipeline splitting (tracing would inline checkpoint()).

Example:
    >>> import torch
    >>> from autoplan.execute.recompute import apply_recompute
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
    >>> apply_recompute(model, ["0"])
    1
    >>> model(torch.randn(2, 4, requires_grad=True)).sum().backward()
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["apply_recompute", "is_recomputed"]

_MARK = "_autoplan_recompute"


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_recompute(root: nn.Module, fqns: Iterable[str]) -> int:
    """Recompute each module ``fqn`` of ``root`` in backward; returns how many modules were wrapped.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> apply_recompute(m, ["0"]), is_recomputed(m[0])
        (1, True)
    """
    count = 0
    for fqn in fqns:
        module = root.get_submodule(fqn)
        if is_recomputed(module):
            continue
        module.forward = functools.partial(_checkpointed, module.forward)
        setattr(module, _MARK, True)
        count += 1
    return count


def is_recomputed(module: nn.Module) -> bool:
    """Whether :func:`apply_recompute` wrapped ``module``.

    Example:
        >>> import torch
        >>> is_recomputed(torch.nn.Linear(2, 2))
        False
    """
    return getattr(module, _MARK, False)
