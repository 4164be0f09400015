"""Prove a tensor-parallel group sound in its DTensor form, when its local-tensor shard is not.

Some attention code reads sizes from its input and reshapes with them (nanoGPT: ``B, T, C = x.size()``, then
``view(B, T, self.n_head, C // self.n_head)``): on local tensors after a colwise projection that view fails or
mixes heads, whatever head count is divided. The executor can instead keep the tensors between the linears as
DTensors of the global shape (colwise styles ``…/dtensor``, :mod:`autoplan.execute.tp_dtensor`). When the
local-tensor check of :mod:`autoplan.trace.tp_check` fails, that form is checked in two steps, on the same random
weights and inputs, and kept only when both pass:

1. **numbers at degree t**: for each rank ``r`` of ``t`` the parent runs at its global shapes and attributes with
   every colwise output row that is not rank ``r``'s (of each fused part) zeroed and every rowwise input column
   that is not rank ``r``'s zeroed (its bias on one rank); the sum over ranks must equal the unsharded output,
   and a parameter left whole between the linears must get its full gradient on every rank. This is what the
   DTensor form computes when every op between the linears keeps the shard on its own rows: it proves that no
   code between the linears mixes one rank's heads with another's;
2. **the executor's own code on DTensors**: a copy of the parent is sharded by
   :func:`autoplan.execute.tensor_parallel.apply_tensor_parallel` over a one-rank world (torch's ``fake`` process
   group, made for the check and removed after it) and runs forward and backward: an op DTensor has no rule for,
   or a plain tensor mixed with a DTensor (a position bias made with the global head count), raises here instead
   of in training, and its output must equal the unsharded one.

Step 2 needs a process group of its own, so it runs only while none is initialized (``autoplan.trace`` /
``autoplan.plan`` in one process); inside an initialized world the group is dropped with that reason (plan it
before ``init_process_group`` and pass the plan to ``autoplan.parallelize``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Attention(nn.Module):  # nanoGPT's view from the input's width
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.n_head, self.n_embd = 2, 8
    ...         self.c_attn, self.c_proj = nn.Linear(8, 24), nn.Linear(8, 8)
    ...     def forward(self, x):
    ...         B, T, C = x.size()
    ...         q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
    ...         q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
    ...         y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ...         return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
    >>> import autoplan
    >>> graph = autoplan.trace(nn.Sequential(Attention()), torch.randn(2, 4, 8))
    >>> graph.layers[0].tp_groups[0].styles
    {'0.c_attn': 'colwise:3/dtensor', '0.c_proj': 'rowwise'}
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from ..vocabulary import DTENSOR_SUFFIX, fused_sizes, tp_style_kind

__all__ = ["as_dtensor_styles", "or_global_verdict", "KEPT_AS_DTENSOR", "INSIDE_A_WORLD"]

#: the verdict of a group sound only in its DTensor form (colwise styles ``…/dtensor``); no letter or digit, so the
#: verdict cache, which swaps a parent's name inside a verdict for a placeholder, never changes it
KEPT_AS_DTENSOR = "<=>"
#: why the DTensor form is not proven inside an initialized process group (such a verdict is not remembered: the
#: same group traced outside one is checked)
INSIDE_A_WORLD = ("its DTensor form is proven on a process group of its own, which cannot be made inside an "
                  "initialized one: plan before init_process_group and pass the plan to autoplan.parallelize")


def as_dtensor_styles(styles: dict[str, str]) -> dict[str, str]:
    """A group's styles in its DTensor form: each colwise style marked ``…/dtensor``.

    Example:
        >>> as_dtensor_styles({"attn.c_attn": "colwise:3", "attn.c_proj": "rowwise"})
        {'attn.c_attn': 'colwise:3/dtensor', 'attn.c_proj': 'rowwise'}
    """
    return {f: s + DTENSOR_SUFFIX if tp_style_kind(s) == "colwise" and not s.endswith(DTENSOR_SUFFIX) else s
            for f, s in styles.items()}




def _zeroed_share(tensor: torch.Tensor, dim: int, sizes: tuple[int, ...], rank: int, t: int) -> torch.Tensor:
    """``tensor`` with every slice on ``dim`` that is not rank ``rank``'s (of each part of ``sizes``) zeroed."""
    keep = torch.zeros(tensor.shape[dim], dtype=torch.bool)
    start = 0
    for part in sizes:
        keep[start + rank * part // t: start + (rank + 1) * part // t] = True
        start += part
    shape = [1] * tensor.dim()
    shape[dim] = -1
    return tensor * keep.view(shape).to(tensor.dtype)


def _global_share(state: dict, parent: str, styles: dict[str, str], rank: int, t: int,
                  transposed: frozenset = frozenset()) -> dict:
    """Rank ``rank``'s share at the global shapes: other ranks' colwise rows and rowwise columns zeroed."""
    from .tp_check import _shard_state  # tp_check imports this module

    return _shard_state(state, parent, styles, rank, t, transposed, cut=_zeroed_share)


def _numbers_error(parent_module, row_module, state, parent, styles, t, args, kwargs, reference, transposed,
                   generator) -> str | None:
    from .tp_check import TOLERANCE, _random, _relative_error, _replica_gradient_error, _rowwise_output

    total = None
    for rank in range(t):
        part = _rowwise_output(parent_module, row_module, _global_share(state, parent, styles, rank, t, transposed),
                               args, kwargs)
        total = part if total is None else total + part
    error = _relative_error(total, reference)
    if not error <= TOLERANCE:
        return (f"with global-shape DTensors a {t}-way shard computes other numbers (relative difference "
                f"{error:.1e}): code between the linears mixes the heads of different ranks")
    return _replica_gradient_error(parent_module, row_module, state, parent, styles, t, args, kwargs,
                                   _random(tuple(reference.shape), generator), transposed, share=_global_share)


def _dtensor_error(parent_module: nn.Module, row_fqn: str, state: dict, parent: str, styles: dict[str, str],
                   args, kwargs, reference: torch.Tensor) -> str | None:
    """Run the executor's DTensor form of the group on a copy of the parent over a one-rank ``fake`` world."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

    from ..execute.tensor_parallel import apply_tensor_parallel
    from .tp_check import _relative_error, TOLERANCE

    if dist.is_available() and dist.is_initialized():
        return INSIDE_A_WORLD
    prefix = parent + "." if parent else ""
    clone = copy.deepcopy(parent_module)
    if any(p.is_meta for p in [*clone.parameters(), *clone.buffers()]):
        clone = clone.to_empty(device="cpu")
    with torch.no_grad():
        for name, value in state.items():
            owner, _, leaf = name.rpartition(".")
            target = getattr(clone.get_submodule(owner) if owner else clone, leaf)
            if isinstance(target, torch.Tensor) and target.shape == value.shape:
                target.copy_(value)
    clone.eval()
    seen: list[torch.Tensor] = []
    try:
        dist.init_process_group("fake", rank=0, world_size=1)
    except Exception as exc:  # noqa: BLE001 - a torch without the fake backend cannot prove the DTensor form
        return f"its DTensor form could not be checked (no one-rank process group: {exc})"[:300]
    try:
        apply_tensor_parallel(clone, {f[len(prefix):]: s for f, s in as_dtensor_styles(styles).items()},
                              DeviceMesh("cpu", [0]))
        clone.get_submodule(row_fqn[len(prefix):]).register_forward_hook(
            lambda m, i, o: seen.append(o) if not seen else None)
        with torch.enable_grad():
            clone(*args, **kwargs)
            out = seen[0]
            if isinstance(out, DTensor) or not isinstance(out, torch.Tensor):
                return f"its DTensor form hands on a {type(out).__name__}, not a whole tensor"
            error = _relative_error(out.detach(), reference)
            if not error <= TOLERANCE:
                return f"its DTensor form computes other numbers (relative difference {error:.1e})"
            out.sum().backward()
    except Exception as exc:  # noqa: BLE001 - whatever DTensor cannot run is not offered
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"its DTensor form fails ({type(exc).__name__}: {first[:160]})"
    finally:
        dist.destroy_process_group()
    return None


def _global_shard_error(model: nn.Module, styles: dict[str, str], parent: str, parent_module: nn.Module, state: dict,
                       args, kwargs, reference: torch.Tensor, t: int, transposed: frozenset,
                       generator: torch.Generator) -> str | None:
    """None when the group ``styles`` is sound in its DTensor form at degree ``t`` (see the module docstring), else
    why not. ``state``, ``args``, ``kwargs`` and ``reference``: the local check's random weights, inputs and
    unsharded rowwise output."""
    row_fqn = next(f for f, s in styles.items() if s == "rowwise")
    row_module = model.get_submodule(row_fqn)
    error = _numbers_error(parent_module, row_module, state, parent, styles, t, args, kwargs, reference,
                           transposed, generator)
    if error is not None:
        return error
    if any(isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() != 2 for m in
           (model.get_submodule(f) for f in styles)):
        return "its DTensor form shards only 2-D weights"
    return _dtensor_error(parent_module, row_fqn, state, parent, styles, args, kwargs, reference)


def or_global_verdict(local: str, model, group, parent, parent_module, state, args, kwargs, reference, t, numeric,
                      transposed, generator) -> str | None:
    """The verdict of a group whose local-tensor shard failed (``local`` says how): :data:`KEPT_AS_DTENSOR` when its
    DTensor form is proven (see the module docstring), else both reasons; ``local`` alone for a parent checked on
    the meta device (shapes only: the DTensor form needs numbers).

    Example:
        >>> or_global_verdict("fails", None, None, "", None, {}, (), {}, None, 2, False, frozenset(), None)
        'fails'
    """
    if not numeric:
        return local
    if any(fused_sizes(style) for style in group.styles.values()):
        return f"{local}; a projection of unequal fused parts has no DTensor form"
    error = _global_shard_error(model, group.styles, parent, parent_module, state, args, kwargs, reference, t,
                                transposed, generator)
    return KEPT_AS_DTENSOR if error is None else f"{local}; {error}"
