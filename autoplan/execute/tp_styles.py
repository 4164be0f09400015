"""Tensor-parallel styles beyond torch's own: GPT-2's ``Conv1D`` (weight stored transposed) and fused projections.

Hugging Face's ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``) is a linear layer whose weight is ``(in, out)``
(``nx``, ``nf``), applied as ``addmm(bias, x, weight)``. So the Megatron split is the one of ``nn.Linear`` on the
transposed dims, laid out with DTensor exactly as torch's ``ColwiseParallel`` / ``RowwiseParallel`` lay out a
Linear, whose input and output handling they inherit (a plan still says ``"colwise"`` / ``"rowwise"``; the executor
picks these styles by the module's type):

- :class:`Conv1DColwise`: ``weight`` ``Shard(1)`` (output features), ``bias`` ``Shard(0)``; the input is replicated,
  the output stays split on its last dim (the local tensor goes on to the module's code, as with a Linear);
- :class:`Conv1DRowwise`: ``weight`` ``Shard(0)`` (input features), ``bias`` ``Replicate()`` (added once: DTensor
  makes the matmul's partial sum and the bias one all-reduced output).

``Conv1D.forward`` then runs on DTensors: ``x.view(-1, nx)``, ``addmm`` and the view back to ``(…, nf)`` keep the
global sizes, and DTensor's sharding rules carry the split through them.

A fused projection (plan style ``colwise:K``: K equal parts, a ``qkv`` with K = 3, a ``gate_up`` with K = 2) is
sharded part by part, as Megatron shards its fused QKV: rank r of t holds rows r of t of every part, [q_r; k_r; v_r],
so the module's own ``split``/``chunk`` cuts its local output into its local q, k and v.
:class:`FusedColwise` places the weight as ``_StridedShard(dim, split_factor=K)`` — DTensor's placement for exactly
this layout — so the parameter stays one DTensor of the original global shape and order: ``full_tensor()``,
``distribute_tensor`` (state-dict loading, initialization on meta) and the optimizer see the original fused weight,
and the matmul keeps the strided layout with no communication (its output is ``_StridedShard(-1, K)``, handed on
as the local tensor).

A projection fusing parts of unequal sizes (plan style ``colwise:a+b+c``: Phi-3's ``qkv_proj`` with grouped
key/value heads, q of ``num_heads·head_dim`` rows, k and v of ``num_key_value_heads·head_dim`` each) has no DTensor
placement for [q_r; k_r; v_r] (``_StridedShard`` cuts K equal parts, and a placement subclass does not survive
DTensor's own ops). :class:`FusedRowsColwise` stores its weight as ``ColwiseParallel`` does, ``Shard(0)``: rows r of
t of the whole fused weight, an ordinary DTensor in the original order for state dicts, checkpoints, initialization,
FSDP and the optimizer. In forward one all-to-all over the tp ranks hands each rank the rows it computes with, rows
r of t of every part ([q_r; k_r; v_r]: whole key/value heads with their query heads), and in backward the inverse
all-to-all hands each gradient row back to the rank that stores it: a permutation of rows, exact, at the cost of
moving the rows a rank stores but does not compute with each way per forward (a third of its share of Phi-3-medium's
``qkv_proj`` at t = 2, all of it at t = 5; one all-to-all of the share for the weight, one for a bias, each way; under autocast the share is cast to the compute precision first, as FSDP's
and ``replicate``'s mixed precision hand it over: priced by :mod:`autoplan.cost.row_exchange`).

Example:
    >>> from transformers.pytorch_utils import Conv1D
    >>> from autoplan.execute.tp_styles import style_for
    >>> type(style_for("colwise", Conv1D(8, 4))).__name__, type(style_for("colwise", None)).__name__
    ('Conv1DColwise', 'ColwiseParallel')
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from ..trace.opgraph import is_conv1d
from ..vocabulary import fused_parts, fused_sizes, keeps_dtensor, tp_style_kind

__all__ = ["Conv1DColwise", "Conv1DRowwise", "FusedColwise", "FusedRowsColwise", "compute_rows", "strided",
           "fsdp_placement", "style_for"]


def _shard_parameters(module: nn.Module, mesh: DeviceMesh, placements: dict, src_data_rank) -> None:
    for name, placement in placements.items():
        param = getattr(module, name, None)
        if param is None:
            continue
        module.register_parameter(name, nn.Parameter(
            distribute_tensor(param, mesh, [placement], src_data_rank=src_data_rank),
            requires_grad=param.requires_grad))


def _distribute(style, module: nn.Module, mesh: DeviceMesh, placements: dict, output_fn=None) -> nn.Module:
    """``distribute_module`` with ``placements`` (parameter name → placement) and ``style``'s own input (and, unless
    ``output_fn`` is given, output) preparation, as torch's Colwise/RowwiseParallel wire them."""

    def partition(name, mod, device_mesh):
        _shard_parameters(mod, device_mesh, placements, style.src_data_rank)

    def input_fn(mod, inputs, device_mesh):
        return style._prepare_input_fn(style.input_layouts, style.desired_input_layouts, mod, inputs, device_mesh)

    def default_output_fn(mod, outputs, device_mesh):
        return style._prepare_output_fn(style.output_layouts, style.use_local_output, mod, outputs, device_mesh)

    return distribute_module(module, mesh, partition, input_fn, output_fn or default_output_fn)


def _require_conv1d(module: nn.Module, style: str) -> None:
    if not is_conv1d(module):
        raise ValueError(f"{style} shards a GPT-2 Conv1D (weight (in, out)), not a {type(module).__name__}; "
                         f"use torch's ColwiseParallel/RowwiseParallel for nn.Linear")


class Conv1DColwise(ColwiseParallel):
    """``ColwiseParallel`` for a ``Conv1D``: output features (weight dim 1, bias dim 0) split over the mesh.

    Example:
        >>> Conv1DColwise()
        Conv1DColwise(input_layouts=(Replicate(),), output_layouts=(Shard(dim=-1),), use_local_output=True)
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _require_conv1d(module, "Conv1DColwise")
        return _distribute(self, module, device_mesh, {"weight": Shard(1), "bias": Shard(0)})


class Conv1DRowwise(RowwiseParallel):
    """``RowwiseParallel`` for a ``Conv1D``: input features (weight dim 0) split, bias replicated, output
    all-reduced.

    Example:
        >>> Conv1DRowwise()
        Conv1DRowwise(input_layouts=(Shard(dim=-1),), output_layouts=(Replicate(),), use_local_output=True)
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _require_conv1d(module, "Conv1DRowwise")
        self.desired_input_layouts = (Shard(-1),)  # the matmul contracts the sharded last dim
        return _distribute(self, module, device_mesh, {"weight": Shard(0), "bias": Replicate()})


class FusedColwise(ColwiseParallel):
    """``ColwiseParallel`` for a projection that fuses ``parts`` equal parts (an ``nn.Linear`` or a ``Conv1D``): each
    rank holds rows r of t of every part (weight and bias ``_StridedShard(out dim, split_factor=parts)``).

    Example:
        >>> FusedColwise(3).parts
        3
    """

    def __init__(self, parts: int, **layouts):
        super().__init__(**layouts)
        if parts < 2:
            raise ValueError(f"FusedColwise needs at least 2 fused parts, got {parts}")
        self.parts = parts

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise ValueError(f"colwise:{self.parts} shards an nn.Linear or a GPT-2 Conv1D, not a "
                             f"{type(module).__name__}")
        out_dim = 1 if is_conv1d(module) else 0
        parts = self.parts

        def local_output(mod, outputs, mesh):
            # the matmul keeps the strided layout: this rank's [q_r; k_r; v_r] is its local tensor as it is
            placement = outputs.placements[0]
            if not (isinstance(placement, _StridedShard) and placement.dim in (-1, outputs.ndim - 1)):
                raise RuntimeError(f"colwise:{parts} expected its output strided over the tp ranks on the last dim, "
                                   f"got {outputs.placements}")
            return outputs.to_local() if self.use_local_output else outputs

        return _distribute(self, module, device_mesh, {"weight": _StridedShard(out_dim, split_factor=parts),
                                                       "bias": _StridedShard(0, split_factor=parts)}, local_output)


def compute_rows(sizes: tuple[int, ...], rank: int, t: int) -> torch.Tensor:
    """The rows of a fused weight of parts ``sizes`` that rank ``rank`` of ``t`` computes with, in order: rows r of t
    of every part.

    Example:
        >>> compute_rows((4, 2, 2), 1, 2).tolist()
        [2, 3, 5, 7]
    """
    starts = [sum(sizes[:p]) for p in range(len(sizes))]
    return torch.cat([torch.arange(start + rank * size // t, start + (rank + 1) * size // t)
                      for start, size in zip(starts, sizes)])


class _RowExchange(torch.autograd.Function):
    """This rank's stored rows (``Shard(0)``: rows r of t of the whole weight) → the rows it computes with, by one
    all-to-all; backward: the inverse all-to-all, each gradient row back to the rank that stores it."""

    @staticmethod
    def forward(ctx, stored, send_index, send_counts, recv_counts, group):
        ctx.send_index, ctx.send_counts, ctx.recv_counts, ctx.group = send_index, send_counts, recv_counts, group
        out = stored.new_empty((sum(recv_counts),) + tuple(stored.shape[1:]))
        dist.all_to_all_single(out, stored.index_select(0, send_index.to(stored.device)).contiguous(), recv_counts,
                               send_counts, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.send_counts),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send_counts, ctx.recv_counts, group=ctx.group)
        stored = torch.empty_like(back)
        stored[ctx.send_index.to(back.device)] = back
        return stored, None, None, None, None


def _exchange_plan(sizes: tuple[int, ...], rank: int, t: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """``(send index, send counts, receive counts)`` of the all-to-all that turns rank ``rank``'s stored rows into
    its compute rows. Every rank's compute rows ascend, so what arrives, source by source, is already in order."""
    per_rank = sum(sizes) // t
    send, send_counts = [], []
    for dest in range(t):
        rows = compute_rows(sizes, dest, t)
        mine = rows[(rows >= rank * per_rank) & (rows < (rank + 1) * per_rank)] - rank * per_rank
        send.append(mine)
        send_counts.append(len(mine))
    rows = compute_rows(sizes, rank, t)
    recv_counts = [int(((rows >= s * per_rank) & (rows < (s + 1) * per_rank)).sum()) for s in range(t)]
    return torch.cat(send), send_counts, recv_counts


def _fused_rows_forward(plan, module: nn.Linear, input):
    """``nn.Linear.forward`` with the weight's (and bias's) compute rows: the output's local features are this
    rank's [q_r; k_r; v_r]."""
    send_index, send_counts, recv_counts = plan

    def compute(param):
        if param is None:
            return None
        mesh = param.device_mesh
        local = param.to_local()
        device = local.device.type
        if torch.is_autocast_enabled(device) and local.is_floating_point():
            # the matmul would cast the rows anyway: cast the share first and exchange half the bytes (a cast and a
            # permutation of rows commute, so the numbers are the same; the cost model prices these bytes)
            local = local.to(torch.get_autocast_dtype(device))
        rows = _RowExchange.apply(local, send_index, send_counts, recv_counts, mesh.get_group())
        return DTensor.from_local(rows, mesh, [Shard(0)], run_check=False)

    return F.linear(input, compute(module.weight), compute(module.bias))


class FusedRowsColwise(ColwiseParallel):
    """``ColwiseParallel`` for an ``nn.Linear`` that fuses parts of unequal ``sizes`` (output features): stored as
    ``Shard(0)``, computed with rows r of t of every part (see the module docstring).

    Example:
        >>> FusedRowsColwise((32, 16, 16)).sizes
        (32, 16, 16)
    """

    def __init__(self, sizes: tuple[int, ...], **layouts):
        super().__init__(**layouts)
        if len(sizes) < 2:
            raise ValueError(f"FusedRowsColwise needs at least 2 fused parts, got {sizes}")
        self.sizes = tuple(sizes)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        style = "colwise:" + "+".join(map(str, self.sizes))
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{style} shards an nn.Linear, not a {type(module).__name__}")
        t = device_mesh.size()
        if sum(self.sizes) != module.out_features or any(size % t for size in self.sizes):
            raise ValueError(f"{style} does not cut the {module.out_features} output features into parts that "
                             f"{t} tp ranks divide; re-plan for this model and mesh")
        if not self.use_local_output:
            raise ValueError(f"{style} hands on its local output only: a projection of unequal fused parts has no "
                             f"DTensor form")
        _distribute(self, module, device_mesh, {"weight": Shard(0), "bias": Shard(0)})
        plan = _exchange_plan(self.sizes, device_mesh.get_local_rank(), t)
        module.forward = types.MethodType(lambda mod, input: _fused_rows_forward(plan, mod, input), module)
        return module


def strided(tensor) -> bool:
    """Whether ``tensor`` is a DTensor with a ``_StridedShard`` placement alone on its dim (a fused projection's
    part-by-part shard): a layout torch.distributed.checkpoint cannot write as one chunk per rank.

    Example:
        >>> import torch
        >>> strided(torch.zeros(2))
        False
    """
    return isinstance(tensor, DTensor) and any(isinstance(p, _StridedShard) for p in tensor.placements)


def fsdp_placement(param) -> Shard | None:
    """FSDP2's ``shard_placement_fn``: a fused projection's weight (strided over tp on its output dim) is sharded
    over dp on its other dim, since FSDP's own dim-0 shard on top of a strided one is not a layout DTensor can
    describe (its full tensor would come out reordered); ``None`` (FSDP's default, dim 0) for every other parameter.

    Example:
        >>> import torch
        >>> fsdp_placement(torch.nn.Parameter(torch.zeros(2, 2))) is None
        True
    """
    if not strided(param):
        return None
    dim = next(p.dim for p in param.placements if isinstance(p, _StridedShard))
    if param.dim() != 2:
        raise ValueError(
            f"FSDP cannot shard a fused projection's {param.dim()}-D parameter (shape {tuple(param.shape)}) that tensor "
            f"parallelism already shards part by part: its only dim is taken; plan with data_parallel='ddp'")
    return Shard(1 - dim)


def style_for(style: str, module: nn.Module | None, **layouts) -> ParallelStyle:
    """The ``ParallelStyle`` for plan style ``style`` on ``module`` (a ``…/dtensor`` colwise style hands on a DTensor,
    ``use_local_output=False``): :class:`FusedColwise` for ``colwise:K``, :class:`FusedRowsColwise` for
    ``colwise:a+b+c``, the
    ``Conv1D`` styles above for a GPT-2 ``Conv1D`` under ``colwise``/``rowwise``, else torch's ``ColwiseParallel``/``RowwiseParallel`` (``layouts``:
    their ``input_layouts``/``output_layouts``/``use_local_output`` keywords).

    Example:
        >>> type(style_for("rowwise", nn.Linear(4, 4))).__name__
        'RowwiseParallel'
    """
    if tp_style_kind(style) not in ("colwise", "rowwise"):
        raise ValueError(f"style_for takes 'colwise', 'colwise:K' or 'rowwise', got {style!r}")
    conv = module is not None and is_conv1d(module)
    if keeps_dtensor(style):  # the output goes on as a global-shape DTensor (autoplan.execute.tp_dtensor)
        layouts = {**layouts, "use_local_output": False}
    if fused_sizes(style) is not None:
        return FusedRowsColwise(fused_sizes(style), **layouts)
    if fused_parts(style) > 1:
        return FusedColwise(fused_parts(style), **layouts)
    if tp_style_kind(style) == "colwise":
        return (Conv1DColwise if conv else ColwiseParallel)(**layouts)
    return (Conv1DRowwise if conv else RowwiseParallel)(**layouts)
