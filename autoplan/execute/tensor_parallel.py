"""Tensor parallelism: the plan's per-module styles applied with DTensor ``parallelize_module``.

Styles (Megatron-LM, Shoeybi et al. 2019 §3): ``colwise`` → ``ColwiseParallel()`` (output features sharded),
``rowwise`` → ``RowwiseParallel()`` (input features sharded, output all-reduced), ``vocab_embedding`` →
``RowwiseParallel(input_layouts=Replicate())`` on an ``nn.Embedding`` (vocabulary rows sharded),
``vocab_head`` → ``ColwiseParallel(output_layouts=Replicate())`` (vocabulary sharded, logits gathered).
An attention module that keeps its head count in attributes (``num_heads``, ``embed_dim``…) gets them divided by
the tp degree, so code such as ``view(B, T, self.num_heads, head_dim)`` sees its local heads.
Weights tied before sharding (a GPT's ``head.weight is tok.weight``) are tied again afterwards; both styles shard
dim 0, so the tied weight keeps one DTensor and one gradient.

Example:
    >>> from autoplan.execute.tensor_parallel import parallel_style
    >>> type(parallel_style("colwise")).__name__
    'ColwiseParallel'
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from ..errors import PlanMismatchError
from ..names import tied_parameter_names  # noqa: F401  (re-exported: apply and data_parallel use it)
from ..trace.tp_check import divide_head_attributes, local_head_owners

__all__ = ["parallel_style", "apply_tensor_parallel", "tied_parameter_names"]


def parallel_style(style: str) -> ParallelStyle:
    """The torch ``ParallelStyle`` for a plan style name.

    Example:
        >>> type(parallel_style("vocab_embedding")).__name__
        'RowwiseParallel'
    """
    if style == "colwise":
        return ColwiseParallel()
    if style == "rowwise":
        return RowwiseParallel()
    if style == "vocab_embedding":
        return RowwiseParallel(input_layouts=Replicate())
    if style == "vocab_head":
        return ColwiseParallel(output_layouts=Replicate())
    raise ValueError(f"unknown tensor-parallel style {style!r}; use colwise, rowwise, vocab_embedding, vocab_head")


def _set_parameter(root: nn.Module, fqn: str, param: nn.Parameter) -> None:
    owner, _, leaf = fqn.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, leaf, param)


def apply_tensor_parallel(root: nn.Module, styles: dict[str, str], tp_mesh: DeviceMesh) -> int:
    """Shard the modules named in ``styles`` (FQNs relative to ``root``) over ``tp_mesh``; returns how many.

    Example (under torchrun with 2 ranks):
        ``apply_tensor_parallel(model, {"fc": "colwise", "proj": "rowwise"}, mesh["tp"])``
    """
    if not styles:
        return 0
    tied = tied_parameter_names(root)
    parallelize_module(root, tp_mesh, {fqn: parallel_style(style) for fqn, style in styles.items()})
    # An attention module that counts its heads in attributes now computes on its local heads (as torchtitan sets
    # n_heads // tp); tracing proved each group sound under exactly this change.
    divide_head_attributes(local_head_owners(root, [f for f, s in styles.items() if s == "colwise"]), tp_mesh.size())
    params = dict(root.named_parameters(remove_duplicate=False))
    for names in tied:
        keep = params[names[0]]
        for name in names[1:]:
            other = params[name]
            if other is keep:
                continue
            placements = getattr(keep, "placements", None), getattr(other, "placements", None)
            if placements[0] != placements[1]:
                raise PlanMismatchError(
                    f"tied parameters {names} would be sharded differently by tensor parallelism "
                    f"({placements[0]} vs {placements[1]}); give their modules matching styles (vocab_embedding "
                    f"with vocab_head) or leave both unsharded, then re-plan"
                )
            _set_parameter(root, name, keep)
    return len(styles)
