"""Forward arguments that tracing adds by itself so that library models trace with their default configs.

Hugging Face transformers models return a key/value cache object (``DynamicCache``, ``EncoderDecoderCache``) when
``use_cache`` is on, which is the default of every causal LM, T5 and BART. The cache is for generation, not training,
and it is no tensor tree that ``torch.export`` can return; so when ``forward`` accepts ``use_cache`` and the caller
did not set it, tracing passes ``use_cache=False``. Nothing else in the model changes: a forward without the cache
computes the same outputs and saves the same activations.

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

from torch import nn

__all__ = ["trace_kwargs", "accepts_keyword"]


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
