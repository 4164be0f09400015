"""Data parallelism over the mesh's "dp" axis: DDP or FSDP2 (``fully_shard``), composing with TP and PP.

- ``fsdp``: ``fully_shard`` on every sizeable plan layer of the stage that owns no tied weight, then on the stage
  root (which takes the rest: tied weights, and small layers such as position embeddings and final norms, each of
  which would otherwise cost an all-gather and a reduce-scatter of its own), as torchtitan does with its blocks.
  Parameters become DTensors sharded on dim 0 over "dp" (2-D with tensor parallelism).
- ``ddp`` alone (no tensor or pipeline parallelism): ``torch.nn.parallel.DistributedDataParallel`` over the dp
  process group, its gradients views of its communication buckets (:func:`distributed_data_parallel`).
- ``ddp`` with tensor or pipeline parallelism: torch's FSDP2-based ``replicate`` (all-reduce, no sharding). It
  accepts DTensor parameters and keeps ``parameters()`` stable, where classic DDP would need parameters swapped
  around each forward, and pipelining drives its gradient reduction once per step (classic DDP's reducer fails
  under the GPipe schedule's all-forwards-then-all-backwards order).

Mixed precision (bf16/fp16 plans): FSDP2 and ``replicate`` compute in the low precision with fp32 parameters and
fp32 gradient reduction (``MixedPrecisionPolicy``); classic DDP runs under ``torch.autocast`` (see
:mod:`autoplan.execute.parallel_model`).

Example:
    >>> from autoplan.execute.data_parallel import shardable_layers
    >>> from autoplan.models import GPT, GPTConfig
    >>> shardable_layers(GPT(GPTConfig()), ["tok", "pos", "blocks.0", "blocks.1", "ln_f", "head"])
    ['blocks.0', 'blocks.1']
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..vocabulary import LOW_PRECISIONS, torch_dtype
from .tensor_parallel import tied_parameter_names
from .tp_styles import fsdp_placement

__all__ = ["shardable_layers", "apply_data_parallel", "distributed_data_parallel", "low_precision_dtype"]



def low_precision_dtype(precision: str) -> torch.dtype | None:
    """The compute dtype of a mixed-precision plan, ``None`` for fp32.

    Example:
        >>> low_precision_dtype("bf16")
        torch.bfloat16
    """
    return torch_dtype(precision) if precision in LOW_PRECISIONS else None


#: A layer becomes an FSDP unit of its own when it holds at least this fraction of the largest layer's parameters.
UNIT_MIN_FRACTION = 1 / 8


def shardable_layers(root: nn.Module, layers: Sequence[str]) -> list[str]:
    """The layers of ``root`` that become FSDP units of their own: present, no tied weight, and holding at least
    :data:`UNIT_MIN_FRACTION` of the largest such layer's parameters.

    Example:
        >>> import torch
        >>> shardable_layers(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()), ["0", "1"])
        ['0']
    """
    tied = {name for names in tied_parameter_names(root) for name in names}
    sizes: dict[str, int] = {}
    for fqn in layers:
        try:
            module = root.get_submodule(fqn)
        except AttributeError:
            continue
        named = list(module.named_parameters(remove_duplicate=False))
        if named and not tied.intersection(f"{fqn}.{n}" for n, _ in named):
            sizes[fqn] = sum(p.numel() for _, p in named)
    largest = max(sizes.values(), default=0)
    return [fqn for fqn, size in sizes.items() if size >= largest * UNIT_MIN_FRACTION]


def _mp_policy(precision: str) -> MixedPrecisionPolicy:
    dtype = low_precision_dtype(precision)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def _leave_experts_alone(root: nn.Module, policy: MixedPrecisionPolicy) -> set[nn.Parameter] | None:
    """The experts' weights expert parallelism sharded over dp (:mod:`autoplan.execute.experts`): FSDP ignores
    them (no sharding, gathering, casting or gradient reduction), so their dispatch casts them to the policy's
    compute dtype itself."""
    from .experts import expert_modules, sharded_expert_parameters

    experts = sharded_expert_parameters(root)
    for _, module in expert_modules(root):
        if getattr(module, "_autoplan_ep", None) is not None:
            module._autoplan_ep_dtype = policy.param_dtype
    return experts or None


def apply_data_parallel(root: nn.Module, kind: str, dp_mesh: DeviceMesh, layers: Sequence[str], precision: str,
                        composed: bool, keep_weights: bool = False) -> nn.Module:
    """Wrap ``root`` for data parallelism of ``kind`` ("ddp" or "fsdp"); returns the module to call (the DDP wrapper,
    or ``root`` itself, changed in place by ``fully_shard``/``replicate``). ``composed``: the model is also tensor-
    or pipeline-parallel. ``keep_weights`` (FSDP, :func:`autoplan.cost.fsdp_keeps_weights`: several microbatches
    or a pipeline): every unit, the root included, keeps its gathered weights after forward
    (``reshard_after_forward=False``), so a step gathers each unit once; otherwise every unit reshards after
    forward and gathers again for backward (ZeRO-3), the root too, so that each unit costs what the cost model
    charges.

    Example (under torchrun, 2 ranks): ``apply_data_parallel(model, "fsdp", mesh["dp"], ["0", "2"], "fp32", False)``
    """
    if kind == "fsdp":
        policy = _mp_policy(precision)
        reshard = not keep_weights
        experts = _leave_experts_alone(root, policy)
        for fqn in shardable_layers(root, layers):
            fully_shard(root.get_submodule(fqn), mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard,
                        shard_placement_fn=fsdp_placement, ignored_params=experts)  # fused tp: the other dim
        fully_shard(root, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard,
                    shard_placement_fn=fsdp_placement, ignored_params=experts)
        return root
    if kind != "ddp":
        raise ValueError(f"data_parallel must be 'ddp' or 'fsdp', got {kind!r}")
    if composed:
        from torch.distributed._composable.replicate_with_fsdp import replicate

        replicate(root, mesh=dp_mesh, mp_policy=_mp_policy(precision))
        return root
    return distributed_data_parallel(root, dp_mesh.get_group())


def distributed_data_parallel(module: nn.Module, group) -> DistributedDataParallel:
    """``module`` under classic DDP over ``group``, its gradients views of DDP's communication buckets
    (``gradient_as_bucket_view=True``): the buckets are the gradients, so a rank holds one gradient-sized buffer,
    as the cost model's 4 bytes of gradient per parameter count, where DDP's default keeps the buckets beside the
    gradients (one more gradient-sized buffer, a quarter more model states under AdamW) and copies between them
    in every step. Calibration times DDP's sync through this too.

    Example (a world of one):
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> ddp = distributed_data_parallel(torch.nn.Linear(4, 4), dist.group.WORLD)
        >>> ddp(torch.ones(2, 4)).sum().backward()
        >>> w, b = ddp.module.weight.grad, ddp.module.bias.grad
        >>> w.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()     # one bucket holds both
        True
        >>> dist.destroy_process_group()
    """
    device = next(module.parameters()).device
    return DistributedDataParallel(module, process_group=group, gradient_as_bucket_view=True,
                                   device_ids=[device.index] if device.type == "cuda" else None)
