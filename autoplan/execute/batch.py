"""Global batches: this data-parallel rank's slice, microbatches, and the default loss.

``inputs`` is a tensor or a tuple/list of positional inputs; dim 0 of every input tensor (and of ``targets``) is the
batch. Non-tensor inputs are passed unchanged to every slice.

Example:
    >>> import torch
    >>> from autoplan.execute.batch import dp_slice
    >>> dp_slice((torch.arange(8),), dp=4, dp_rank=1)
    (tensor([2, 3]),)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["as_args", "batch_size_of", "dp_slice", "microbatches", "default_loss"]


def as_args(inputs: Any) -> tuple:
    """Positional inputs as a tuple (a lone tensor becomes a 1-tuple).

    Example:
        >>> as_args(torch.zeros(1)) == (torch.zeros(1),)
        True
    """
    if isinstance(inputs, dict):
        raise ValueError(
            "train_step/evaluate take positional inputs (a tensor or a tuple of tensors), got a dict; pass the "
            "values in forward's order as a tuple"
        )
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def batch_size_of(args: tuple) -> int:
    """Dim 0 of the first tensor input.

    Example:
        >>> batch_size_of((torch.zeros(6, 2),))
        6
    """
    for value in args:
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError("inputs hold no tensor: give at least one tensor whose dim 0 is the batch")


def _chunk(value: Any, parts: int, index: int) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    size = value.shape[0] // parts
    return value[index * size:(index + 1) * size]


def dp_slice(args: tuple, dp: int, dp_rank: int) -> tuple:
    """This data-parallel rank's contiguous 1/dp of every input tensor.

    Example:
        >>> dp_slice((torch.arange(4), "x"), dp=2, dp_rank=0)
        (tensor([0, 1]), 'x')
    """
    return tuple(_chunk(v, dp, dp_rank) for v in args)


def microbatches(args: tuple, count: int) -> list[tuple]:
    """``count`` equal microbatches of every input tensor, in order.

    Example:
        >>> [mb[0].tolist() for mb in microbatches((torch.arange(4),), 2)]
        [[0, 1], [2, 3]]
    """
    return [tuple(_chunk(v, count, i) for v in args) for i in range(count)]


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the last dim for integer targets (language models: logits (B, T, V), targets
    (B, T)); mean squared error otherwise.

    Example:
        >>> float(default_loss(torch.zeros(2, 3), torch.zeros(2, 3)))
        0.0
    """
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(
            f"the default loss needs the model to return a tensor, got {type(outputs).__name__}; pass "
            f"loss_fn=lambda outputs, targets: ... to autoplan.parallelize"
        )
    if not targets.dtype.is_floating_point and not targets.dtype.is_complex:
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]).float(), targets.reshape(-1))
    return F.mse_loss(outputs.float(), targets.float())
