"""Attention that keeps its tensors global: the DTensor form of a tensor-parallel group.

nanoGPT's attention reads the hidden size from its input and reshapes with it::

    B, T, C = x.size()
    q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
    k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
    ...
    y = y.transpose(1, 2).contiguous().view(B, T, C)

With plain local tensors after a colwise ``c_attn`` no head count can be divided to make that right: ``C`` is the
global width on every rank. In the DTensor form (plan style ``colwise:K/dtensor`` or ``colwise/dtensor``) the colwise
projection hands on its output as a DTensor of the global shape (``use_local_output=False``), the module's
attributes keep their global values, and every op between the linears runs on DTensors: ``view``, ``transpose``,
``contiguous`` and attention keep the shard on the head dim with no communication, by DTensor's own sharding rules,
and the rowwise projection takes the DTensor as it comes (its input already sharded on the last dim). Two pieces
DTensor lacks are added here, both exact by construction:

- :class:`FusedPartsSplit`: a fused projection's output is placed ``_StridedShard(-1, split_factor=K)`` (rank r holds
  [q_r; k_r; v_r]); DTensor's ``split`` would gather it whole before cutting. Cut into exactly its K equal parts on
  that dim, each part is ``Shard(-1)`` with this rank's piece of it as its local tensor: the split runs on the local
  tensor (``to_local`` / ``from_local``, so the gradient is cut and joined locally too). Active only inside the
  forward of the module that owns the projection; every other call passes through unchanged.
- :func:`register_cpu_attention_sharding`: CPU's fused attention kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward) gets the sharding rules DTensor gives the
  CUDA kernels: all replicated, heads (dim 1) sharded, or batch (dim 0) sharded; an attention mask follows the dim it
  broadcasts over.

Example:
    >>> import torch
    >>> from autoplan.execute.tp_dtensor import FusedPartsSplit
    >>> with FusedPartsSplit():  # plain tensors pass through
    ...     [p.shape[-1] for p in torch.ones(2, 6).split(2, dim=1)]
    [2, 2, 2]
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.overrides import TorchFunctionMode

__all__ = ["FusedPartsSplit", "keep_fused_parts_local", "register_cpu_attention_sharding"]

_SPLITS = {torch.Tensor.split, torch.split, torch.Tensor.chunk, torch.chunk, torch.Tensor.split_with_sizes}


def _equal_parts(func, tensor: torch.Tensor, args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """``(dim, parts)`` of a split/chunk call that cuts ``tensor`` into equal parts, else None."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    if not isinstance(dim, int):
        return None
    dim = dim % tensor.ndim
    size = tensor.shape[dim]
    how = args[0] if args else kwargs.get("split_size_or_sections", kwargs.get("split_size", kwargs.get("chunks")))
    if func in (torch.Tensor.chunk, torch.chunk):
        return (dim, how) if isinstance(how, int) and how > 0 and size % how == 0 else None
    if isinstance(how, int):
        return (dim, size // how) if how > 0 and size % how == 0 else None
    sizes = list(how) if isinstance(how, (list, tuple)) else None
    if sizes and len(set(sizes)) == 1 and sum(sizes) == size:
        return dim, len(sizes)
    return None


class FusedPartsSplit(TorchFunctionMode):
    """Cut a DTensor placed ``_StridedShard(d, split_factor=K)`` into its K equal parts on dim ``d`` locally: each
    part is ``Shard(d)`` holding this rank's rows of it (see the module docstring). Any other call runs as it is.

    Example:
        >>> import torch
        >>> with FusedPartsSplit():
        ...     len(torch.ones(3, 4).chunk(2, dim=1))
        2
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SPLITS and args and isinstance(args[0], DTensor):
            tensor = args[0]
            placements = tensor.placements
            found = _equal_parts(func, tensor, args[1:], kwargs)
            if found is not None and len(placements) == 1 and isinstance(placements[0], _StridedShard):
                dim, parts = found
                placement = placements[0]
                if placement.dim % tensor.ndim == dim and placement.split_factor == parts:
                    local = tensor.to_local()
                    mesh = tensor.device_mesh
                    if local.shape[dim] % parts == 0:
                        shape = list(tensor.shape)
                        shape[dim] //= parts
                        return tuple(DTensor.from_local(piece, mesh, (Shard(dim),), run_check=False,
                                                        shape=torch.Size(shape),
                                                        stride=torch.empty(shape, device="meta").stride())
                                     for piece in local.split(local.shape[dim] // parts, dim=dim))
        return func(*args, **kwargs)


def _enter(mode_box: list, module, args):
    mode = FusedPartsSplit()
    mode.__enter__()
    mode_box.append(mode)


def _exit(mode_box: list, module, args, output):
    if mode_box:
        mode_box.pop().__exit__(None, None, None)


def keep_fused_parts_local(owner: nn.Module) -> None:
    """Make :class:`FusedPartsSplit` active in ``owner``'s forward (the module that cuts its fused projection's
    output), and only there.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 2)
        >>> keep_fused_parts_local(m)
        >>> m(torch.ones(1, 2)).shape
        torch.Size([1, 2])
    """
    if getattr(owner, "_autoplan_fused_split", False):
        return
    box: list = []
    owner.register_forward_pre_hook(functools.partial(_enter, box))
    owner.register_forward_hook(functools.partial(_exit, box), always_call=True)
    owner._autoplan_fused_split = True


def _mask_placement(mask, dim_of: int):
    """The placement of an attention mask when q/k/v are sharded on ``dim_of`` (0 batch, 1 heads): sharded on the
    same dim where it has one of more than one element, else replicated (it broadcasts over that dim)."""
    if mask is None:
        return None
    offset = mask.ndim - 4 + dim_of  # the mask broadcasts from the right against (B, H, L, S)
    if offset >= 0 and mask.shape[offset] > 1:
        return Shard(offset)
    return Replicate()


@functools.cache
def register_cpu_attention_sharding() -> None:
    """Give DTensor sharding rules for CPU's fused attention kernel and its backward (once per process): replicated,
    heads sharded or batch sharded, as DTensor's rules for the CUDA kernels. Without them scaled_dot_product_attention
    on CPU DTensors raises.

    Example:
        >>> register_cpu_attention_sharding()
    """
    from torch.distributed.tensor.experimental import register_sharding

    aten = torch.ops.aten

    @register_sharding(aten._scaled_dot_product_flash_attention_for_cpu.default)
    def forward_rules(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
        rules = []
        for placement, dim in ((Replicate(), None), (Shard(1), 1), (Shard(0), 0)):
            mask = [] if attn_mask is None else [Replicate() if dim is None else _mask_placement(attn_mask, dim)]
            rules.append(([placement, placement], [placement] * 3 + [None, None] + mask + [None]))
        return rules

    @register_sharding(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
    def backward_rules(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None,
                       scale=None):
        rules = []
        for placement, dim in ((Replicate(), None), (Shard(1), 1), (Shard(0), 0)):
            mask = [] if attn_mask is None else [Replicate() if dim is None else _mask_placement(attn_mask, dim)]
            rules.append(([placement] * 3, [placement] * 6 + [None, None] + mask + [None]))
        return rules
