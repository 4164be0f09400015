"""A model fingerprint: the same for every copy of one architecture, different for another.

Example:
    >>> import torch
    >>> from autoplan.trace.fingerprint import model_fingerprint
    >>> a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    >>> model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(torch.nn.Linear(4, 5))
    True
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["model_fingerprint"]


def model_fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits from the class name and every parameter and buffer FQN with its shape.

    Tied parameters appear under each of their names, so untying a weight changes the fingerprint. dtype and
    device are left out: the same plan applies to a model cast to bf16 or moved to a GPU.
    """
    h = hashlib.sha256(type(model).__name__.encode())
    for name, p in model.named_parameters(remove_duplicate=False):
        h.update(f"p:{name}:{tuple(p.shape)};".encode())
    for name, b in model.named_buffers(remove_duplicate=False):
        h.update(f"b:{name}:{tuple(b.shape)};".encode())
    return h.hexdigest()[:16]
