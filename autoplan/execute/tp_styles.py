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

Example:
    >>> from transformers.pytorch_utils import Conv1D
    >>> from autoplan.execute.tp_styles import style_for
    >>> type(style_for("colwise", Conv1D(8, 4))).__name__, type(style_for("colwise", None)).__name__
    ('Conv1DColwise', 'ColwiseParallel')
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from ..trace.opgraph import is_conv1d
from ..vocabulary import fused_parts, keeps_dtensor, tp_style_kind

__all__ = ["Conv1DColwise", "Conv1DRowwise", "FusedColwise", "strided", "fsdp_placement", "style_for"]


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
    ``use_local_output=False``): :class:`FusedColwise` for ``colwise:K``, the
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
    if fused_parts(style) > 1:
        return FusedColwise(fused_parts(style), **layouts)
    if tp_style_kind(style) == "colwise":
        return (Conv1DColwise if conv else ColwiseParallel)(**layouts)
    return (Conv1DRowwise if conv else RowwiseParallel)(**layouts)
