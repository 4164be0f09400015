"""Tensor-parallel styles for GPT-2's ``Conv1D``: Megatron's colwise/rowwise split with the weight stored transposed.

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

Example:
    >>> from transformers.pytorch_utils import Conv1D
    >>> from autoplan.execute.tp_styles import style_for
    >>> type(style_for("colwise", Conv1D(8, 4))).__name__, type(style_for("colwise", None)).__name__
    ('Conv1DColwise', 'ColwiseParallel')
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from ..trace.opgraph import is_conv1d

__all__ = ["Conv1DColwise", "Conv1DRowwise", "style_for"]


def _shard_parameters(module: nn.Module, mesh: DeviceMesh, placements: dict, src_data_rank) -> None:
    for name, placement in placements.items():
        param = getattr(module, name, None)
        if param is None:
            continue
        module.register_parameter(name, nn.Parameter(
            distribute_tensor(param, mesh, [placement], src_data_rank=src_data_rank),
            requires_grad=param.requires_grad))


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

        def partition(name, mod, mesh):
            _shard_parameters(mod, mesh, {"weight": Shard(1), "bias": Shard(0)}, self.src_data_rank)

        return distribute_module(module, device_mesh, partition,
                                 lambda mod, inputs, mesh: self._prepare_input_fn(
                                     self.input_layouts, self.desired_input_layouts, mod, inputs, mesh),
                                 lambda mod, outputs, mesh: self._prepare_output_fn(
                                     self.output_layouts, self.use_local_output, mod, outputs, mesh))


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

        def partition(name, mod, mesh):
            _shard_parameters(mod, mesh, {"weight": Shard(0), "bias": Replicate()}, self.src_data_rank)

        return distribute_module(module, device_mesh, partition,
                                 lambda mod, inputs, mesh: self._prepare_input_fn(
                                     self.input_layouts, self.desired_input_layouts, mod, inputs, mesh),
                                 lambda mod, outputs, mesh: self._prepare_output_fn(
                                     self.output_layouts, self.use_local_output, mod, outputs, mesh))


def style_for(style: str, module: nn.Module | None, **layouts) -> ParallelStyle:
    """The ``ParallelStyle`` for plan style ``style`` on ``module``: the ``Conv1D`` styles above for a GPT-2
    ``Conv1D`` under ``colwise``/``rowwise``, else torch's ``ColwiseParallel``/``RowwiseParallel`` (``layouts``:
    their ``input_layouts``/``output_layouts``/``use_local_output`` keywords).

    Example:
        >>> type(style_for("rowwise", nn.Linear(4, 4))).__name__
        'RowwiseParallel'
    """
    if style not in ("colwise", "rowwise"):
        raise ValueError(f"style_for takes 'colwise' or 'rowwise', got {style!r}")
    conv = module is not None and is_conv1d(module)
    if style == "colwise":
        return (Conv1DColwise if conv else ColwiseParallel)(**layouts)
    return (Conv1DRowwise if conv else RowwiseParallel)(**layouts)
