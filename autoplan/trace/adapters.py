"""Forward arguments that tracing adds by itself so that library models trace with their default configs.

Hugging Face transformers models return a key/value cache object (``DynamicCache``, ``EncoderDecoderCache``) when
``use_cache`` is on, which is the default of every causal LM, T5 and BART. The cache is for generation, not training,
and it is no tensor tree that ``torch.export`` can return; so when ``forward`` accepts ``use_cache`` and the caller
did not set it, tracing passes ``use_cache=False``. Nothing else in the model changes: a forward without the cache
computes the same outputs and saves the same activations.

The trace's fake forwards (what is saved, FLOPs) of a transformers model run with the cache on instead
(:func:`fake_run_kwargs`):
without a cache, transformers checks the position ids for packed sequences before it skips the causal mask, a check
it cannot make on fake tensors, so it builds the mask a real forward skips, and with it SDPA leaves its
grouped-query path and saves keys and values repeated to every query head. The cache, whose keys and values are
the ones autograd saves anyway, skips the check as a real forward of unpacked sequences does. Recorded inputs hold
no cache object (:func:`without_caches`): the numeric checks run the modules without one.

Example:
    >>> import torch
    >>> class Causal(torch.nn.Module):
    ...     def forward(self, input_ids, use_cache=None):
    ...         return input_ids
    >>> trace_kwargs(Causal(), {})
    {'use_cache': False}
    >>> trace_kwargs(Causal(), {"use_cache": True})   # the caller's choice stands
    {'use_cache': True}
    >>> trace_kwargs(torch.nn.Linear(2, 2), {})
    {}
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.utils._pytree as pytree
from torch import nn

__all__ = ["trace_kwargs", "fake_run_kwargs", "without_caches", "accepts_keyword"]


def accepts_keyword(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` takes a parameter called ``name`` (explicitly, not through ``**kwargs``).

    Example:
        >>> import torch
        >>> accepts_keyword(torch.nn.Linear(2, 2), "input"), accepts_keyword(torch.nn.Linear(2, 2), "use_cache")
        (True, False)
    """
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # a builtin or C forward has no inspectable signature
        return False
    return name in params and params[name].kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    )


def trace_kwargs(module: nn.Module, kwargs: dict) -> dict:
    """``kwargs`` plus ``use_cache=False`` when ``module.forward`` accepts it and the caller left it unset."""
    if "use_cache" not in kwargs and accepts_keyword(module, "use_cache"):
        return {**kwargs, "use_cache": False}
    return dict(kwargs)


def fake_run_kwargs(module: nn.Module, kwargs: dict) -> dict:
    """What the trace's fake forwards run with (see the module docstring): ``kwargs``, plus ``use_cache=True`` for a
    transformers model whose forward accepts it when the caller left it unset; any other model's forward gets what
    ``torch.export`` gets (:func:`trace_kwargs`), whatever its ``use_cache`` means.

    Example:
        >>> import torch
        >>> class Causal(torch.nn.Module):
        ...     def forward(self, input_ids, use_cache=None):
        ...         return input_ids
        >>> fake_run_kwargs(Causal(), {})                       # not a transformers model
        {'use_cache': False}
        >>> Causal.__module__ = "transformers.models.toy"
        >>> fake_run_kwargs(Causal(), {}), fake_run_kwargs(Causal(), {"use_cache": False})
        ({'use_cache': True}, {'use_cache': False})
    """
    from_transformers = any(cls.__module__.startswith("transformers.") for cls in type(module).__mro__)
    if from_transformers and "use_cache" not in kwargs and accepts_keyword(module, "use_cache"):
        return {**kwargs, "use_cache": True}
    return trace_kwargs(module, kwargs)


def without_caches(tree: Any) -> Any:
    """``tree`` (a module call's recorded ``(args, kwargs)``) with every generation cache object replaced by None:
    one recognised by the methods transformers' ``Cache`` classes have (``update``, ``get_seq_length``).

    Example:
        >>> class Cache:
        ...     def update(self): ...
        ...     def get_seq_length(self): ...
        >>> without_caches(((1,), {"past_key_values": Cache(), "x": 2}))
        ((1,), {'past_key_values': None, 'x': 2})
    """
    def strip(value):
        return None if callable(getattr(value, "update", None)) and callable(
            getattr(value, "get_seq_length", None)) else value

    return pytree.tree_map(strip, tree)
