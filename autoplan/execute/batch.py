"""Global batches: checks that give clear answers, this data-parallel rank's slice, microbatches, the loss.

Inputs take the forms :func:`autoplan.plan` takes: a tensor, a tuple/list of positional inputs, or a dict of
keyword inputs (``{"input_ids": ids, "attention_mask": mask}``); dim 0 of every input tensor (and of ``targets``)
is the batch. Non-tensor inputs are passed unchanged to every slice.

Example:
    >>> import torch
    >>> from autoplan.execute.batch import Inputs
    >>> Inputs.of({"ids": torch.arange(8), "scale": 2.0}).chunk(4, 1)
    Inputs(args=(), kwargs={'ids': tensor([2, 3]), 'scale': 2.0})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Inputs", "as_args", "batch_size_of", "dp_slice", "microbatches", "check_targets", "default_loss",
           "checked_loss", "guard_token_ids"]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
    return "None" if value is None else f"a {type(value).__name__}"


def _chunk(value: Any, parts: int, index: int) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    size = value.shape[0] // parts
    return value[index * size:(index + 1) * size]


@dataclass(frozen=True)
class Inputs:
    """One batch of model inputs: positional ``args`` and keyword ``kwargs``, run as ``model(*args, **kwargs)``."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, inputs: Any) -> "Inputs":
        """From a tensor, a tuple/list of positional inputs, a dict of keyword inputs, or a 1-tuple holding that
        dict (``pm({"x": x})``).

        Example:
            >>> Inputs.of(torch.zeros(2)).args[0].shape, Inputs.of(({"x": 1},)).kwargs
            (torch.Size([2]), {'x': 1})
        """
        if isinstance(inputs, Inputs):
            return inputs
        if isinstance(inputs, (tuple, list)) and len(inputs) == 1 and isinstance(inputs[0], Mapping):
            inputs = inputs[0]
        if isinstance(inputs, Mapping):
            bad = [k for k in inputs if not isinstance(k, str)]
            if bad:
                raise ValueError(f"keyword inputs need string keys (forward's argument names), got {bad[:3]}")
            return cls((), dict(inputs))
        return cls(tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,), {})

    @property
    def batch_size(self) -> int:
        """Dim 0 of the input tensors; ``ValueError`` when there is none or they differ.

        Example:
            >>> Inputs.of((torch.zeros(6, 2), torch.zeros(6))).batch_size
            6
        """
        sizes = {}
        for name, value in [*enumerate(self.args), *self.kwargs.items()]:
            if isinstance(value, torch.Tensor):
                if value.dim() == 0:
                    raise ValueError(f"input {name!r} is a 0-dim tensor; every input tensor needs a batch dim (dim 0)")
                sizes[name] = value.shape[0]
        if not sizes:
            raise ValueError("inputs hold no tensor: give at least one tensor whose dim 0 is the batch")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"dim 0 of every input is the batch, but they differ: {sizes} (input: dim 0)")
        return next(iter(sizes.values()))

    def map(self, fn: Callable[[Any], Any]) -> "Inputs":
        """``fn`` applied to every input (positional and keyword), e.g. a move to a device.

        Example:
            >>> Inputs.of({"x": 1}).map(lambda v: v + 1).kwargs
            {'x': 2}
        """
        return Inputs(tuple(fn(v) for v in self.args), {k: fn(v) for k, v in self.kwargs.items()})

    def chunk(self, parts: int, index: int) -> "Inputs":
        """The ``index``-th of ``parts`` contiguous equal slices of every input tensor (other values unchanged).

        Example:
            >>> Inputs.of((torch.arange(6), "x")).chunk(3, 2).args
            (tensor([4, 5]), 'x')
        """
        return self.map(lambda v: _chunk(v, parts, index))

    def split(self, count: int) -> list["Inputs"]:
        """``count`` equal microbatches, in order.

        Example:
            >>> [mb.kwargs["ids"].tolist() for mb in Inputs.of({"ids": torch.arange(4)}).split(2)]
            [[0, 1], [2, 3]]
        """
        return [self.chunk(count, i) for i in range(count)]


def as_args(inputs: Any) -> tuple:
    """Example inputs as the tuple planning takes: positional inputs, or the dict of keyword inputs alone in a
    1-tuple (the form :func:`autoplan.plan` accepts; a lone tensor becomes a 1-tuple).

    Example:
        >>> as_args(torch.zeros(1)) == (torch.zeros(1),), as_args({"x": 1})
        (True, ({'x': 1},))
    """
    if isinstance(inputs, Inputs):
        if inputs.args and inputs.kwargs:
            raise ValueError("planning takes positional or keyword example inputs, not both; pass all inputs as a "
                             "dict of keyword inputs")
        return (dict(inputs.kwargs),) if inputs.kwargs else inputs.args
    if isinstance(inputs, Mapping):
        return (dict(inputs),)
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def batch_size_of(args: tuple) -> int:
    """Dim 0 of the input tensors.

    Example:
        >>> batch_size_of((torch.zeros(6, 2),))
        6
    """
    return Inputs.of(args).batch_size


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


def check_targets(targets: Any, batch_size: int, what: str = "train_step") -> None:
    """``targets`` must be a tensor with ``batch_size`` rows; ``ValueError`` saying what was expected otherwise.

    Example:
        >>> try:
        ...     check_targets(None, 4)
        ... except ValueError as e:
        ...     print(str(e)[:63])
        train_step(inputs, targets) needs targets: a tensor whose dim 0
    """
    if targets is None:
        raise ValueError(
            f"{what}(inputs, targets) needs targets: a tensor whose dim 0 is the batch ({batch_size} samples), "
            f"which the loss compares with the outputs (loss_fn(outputs, targets)); got None. A model that computes "
            f"its own loss can take loss_fn=lambda outputs, targets: outputs.loss with the labels as targets"
        )
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"{what}: targets must be a tensor whose dim 0 is the batch, got {_describe(targets)}")
    if targets.dim() == 0 or targets.shape[0] != batch_size:
        raise ValueError(f"{what}: targets have {targets.shape[0] if targets.dim() else 0} samples (dim 0) but "
                         f"inputs have {batch_size}; pass one target row per input sample")


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the last dim for integer targets (language models: logits (B, T, V), targets
    (B, T)); mean squared error for floating targets of the outputs' shape. A transformers ``ModelOutput`` (or
    any output with a tensor ``logits``) is judged by its logits. Anything else is a ``ValueError`` saying which
    was expected (never a silently broadcast loss).

    Example:
        >>> float(default_loss(torch.zeros(2, 3), torch.zeros(2, 3)))
        0.0
        >>> from types import SimpleNamespace
        >>> round(float(default_loss(SimpleNamespace(logits=torch.zeros(2, 4)), torch.tensor([1, 3]))), 4)  # ln 4
        1.3863
    """
    if not isinstance(outputs, torch.Tensor) and isinstance(getattr(outputs, "logits", None), torch.Tensor):
        outputs = outputs.logits
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(
            f"the default loss needs the model to return a tensor, got {type(outputs).__name__}; pass "
            f"loss_fn=lambda outputs, targets: ... to autoplan.parallelize"
        )
    if not targets.dtype.is_floating_point and not targets.dtype.is_complex:
        if targets.dtype == torch.bool or outputs.shape[:-1] != targets.shape:
            raise ValueError(
                f"the default loss is cross-entropy for integer targets: outputs (..., classes) and targets of class "
                f"ids shaped like outputs without the last dim; got outputs {_describe(outputs)} and targets "
                f"{_describe(targets)}. Pass loss_fn=... for another loss"
            )
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]).float(), targets.reshape(-1))
    if outputs.shape != targets.shape:
        raise ValueError(
            f"targets are {_describe(targets)} but outputs are {_describe(outputs)}: the default loss is mean squared "
            f"error for floating targets, which must have the outputs' shape; for a classification loss "
            f"(cross-entropy) pass integer class ids (targets.long()) shaped like outputs without the last dim"
        )
    return F.mse_loss(outputs.float(), targets.float())


def checked_loss(loss_fn: Callable | None) -> Callable:
    """``loss_fn`` (default: :func:`default_loss`) that must return a scalar tensor, the mean over its microbatch;
    a torch error inside it comes back as a ``ValueError`` naming the outputs' and targets' shapes and dtypes.

    Example:
        >>> loss = checked_loss(torch.nn.MSELoss(reduction="none"))
        >>> try:
        ...     loss(torch.zeros(2, 3), torch.zeros(2, 3))
        ... except ValueError as e:
        ...     print(str(e)[:61])
        loss_fn must return the mean loss over its microbatch as a sc
    """
    inner = loss_fn or default_loss
    if getattr(inner, "_autoplan_checked", False):
        return inner

    def loss(outputs: Any, targets: Any) -> torch.Tensor:
        try:
            value = inner(outputs, targets)
        except (RuntimeError, TypeError, IndexError) as exc:
            hint = ""
            if isinstance(targets, torch.Tensor) and targets.dtype.is_floating_point:
                hint = (" A classification loss (cross-entropy) needs integer class ids: pass targets.long() "
                        "(float targets are class probabilities of the outputs' shape).")
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"loss_fn(outputs, targets) failed on outputs {_describe(outputs)} and targets "
                             f"{_describe(targets)}: {first}.{hint}") from exc
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(
                f"loss_fn must return the mean loss over its microbatch as a scalar tensor, got {_describe(value)}; "
                f"use reduction='mean' (not 'none' or a per-sample loss) so that gradients average over the batch"
            )
        return value

    loss._autoplan_checked = True  # type: ignore[attr-defined]
    return loss


def _check_indices(fqn: str) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        indices = args[0] if args else None
        if isinstance(indices, torch.Tensor) and (indices.dtype.is_floating_point or indices.dtype.is_complex):
            raise ValueError(
                f"embedding {fqn!r} got {_describe(indices)} as indices; token ids must be an integer tensor "
                f"(torch.long or torch.int): pass ids.long(), not float values"
            )

    return hook


def guard_token_ids(modules: list[nn.Module]) -> None:
    """Make every ``nn.Embedding`` in ``modules`` refuse floating indices with an autoplan error (a model given
    float token ids), once per module; the check runs before tensor-parallel input hooks.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Embedding(4, 2)); guard_token_ids([m])
        >>> try:
        ...     m(torch.zeros(3))
        ... except ValueError as e:
        ...     print(str(e)[:46])
        embedding '0' got a float32 tensor of shape (3
    """
    for root in modules:
        for fqn, module in root.named_modules():
            # an Embedding subclass with its own forward (OPT's learned positions take the attention mask) reads
            # other inputs first: only the plain lookup is guarded
            plain = type(module).forward is nn.Embedding.forward
            if isinstance(module, nn.Embedding) and plain and not getattr(module, "_autoplan_ids_checked", False):
                module.register_forward_pre_hook(_check_indices(fqn), prepend=True)
                module._autoplan_ids_checked = True
