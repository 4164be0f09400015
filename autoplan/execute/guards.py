"""Checks that turn hangs and silently wrong training into prompt, clear errors.

- :func:`fail_together`: when one rank raises while applying a plan or in a step, it posts its error in the job's
  key-value store and shuts its process groups down, so that ranks waiting for it in a collective fail at once
  (gloo: "connection closed") and raise the FIRST failing rank's error instead; a rank that stalls without raising
  is caught by the process group's ``timeout`` (``autoplan.parallelize(..., timeout=...)``). After such an error
  the process groups are gone: end the job and resume from the last checkpoint.
- :func:`check_not_parallelized`: a model already wrapped by autoplan, FSDP, DDP or DTensor.
- :func:`agree_on_initial_weights`: ranks that built a real model with different seeds get rank 0's weights.
- :func:`check_batch_norm`: batch statistics over a data-parallel slice or a microbatch differ from one process.
- :func:`watch_replaced_parameters`: an optimizer built before ``parallelize`` holds parameters that no longer
  train; its ``step()`` raises.
- :func:`check_ddp_gradients`: classic DDP with parameters that got no gradient.

Example:
    >>> import torch
    >>> from autoplan.execute.guards import check_not_parallelized
    >>> check_not_parallelized(torch.nn.Linear(2, 2))  # a plain model passes
"""

from __future__ import annotations

import contextlib
import weakref
from datetime import timedelta
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .. import errors

__all__ = ["fail_together", "check_not_parallelized", "mark_parallelized", "agree_on_initial_weights",
           "check_batch_norm", "watch_replaced_parameters", "check_ddp_gradients"]

_FAILED_KEY = "autoplan/failed"
_ERROR_KEY = "autoplan/error"
_MARK = "_autoplan_parallelized"
_ERROR_WAIT_S = 30  # how long a rank waits for the first failing rank's message before raising its own error


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no default group, or one without a store
        return None


def _reraise_as(name: str, message: str, cause: BaseException) -> None:
    kind = getattr(errors, name, None)
    if not (isinstance(kind, type) and issubclass(kind, Exception)):
        kind = {"ValueError": ValueError, "TypeError": TypeError}.get(name, RuntimeError)
    raise kind(message) from cause


# The first failure seen by this process: (rank, what it was doing, error type, message). Once a rank has failed the
# process groups are gone, so later calls raise it again at once instead of torch's "not initialized".
_first_failure: tuple[str, str, str, str] | None = None


def _raise_failure(failure: tuple[str, str, str, str], cause: BaseException | None) -> None:
    rank, during, name, message = failure
    _reraise_as(name, f"rank {rank} failed during {during}, so every rank stops: {message}", cause)


@contextlib.contextmanager
def fail_together(what: str, sync: bool = True) -> Iterator[None]:
    """Run ``what`` (e.g. "train_step") so that an error on one rank ends it on every rank, each raising the first
    failing rank's error. ``sync``: end with a barrier, so that ranks that finished their part before the failing
    rank raised learn of it here rather than in their next collective. A world of one runs the body as is.

    Example:
        >>> with fail_together("a step"):
        ...     pass
    """
    global _first_failure
    if _first_failure is not None:
        _raise_failure(_first_failure, None)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    store, rank = _store(), dist.get_rank()
    try:
        yield
        if sync:
            dist.barrier()
    except Exception as exc:
        if store is None:
            raise
        failure = None
        if store.add(_FAILED_KEY, 1) == 1:
            store.set(_ERROR_KEY, "\n".join([str(rank), what, type(exc).__name__, str(exc)]))
        else:
            try:
                store.wait([_ERROR_KEY], timedelta(seconds=_ERROR_WAIT_S))  # posted right after the count
                failure = tuple(store.get(_ERROR_KEY).decode().split("\n", 3))
            except Exception:  # the first failing rank died before posting: raise this rank's own error
                pass
        _first_failure = failure or (str(rank), what, type(exc).__name__, str(exc))
        # Peers blocked in a collective with this rank fail now instead of at the timeout.
        dist.destroy_process_group()
        if failure is None:
            raise
        _raise_failure(failure, exc)


def check_not_parallelized(model: nn.Module) -> None:
    """Refuse a model that autoplan, FSDP, DDP or tensor parallelism has already changed.

    Example:
        >>> m = torch.nn.Linear(2, 2); mark_parallelized(m)
        >>> try:
        ...     check_not_parallelized(m)
        ... except ValueError as e:
        ...     print(str(e)[:40])
        the model was already parallelized by au
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    how = None
    if getattr(model, _MARK, False):
        how = "autoplan.parallelize"
    elif isinstance(model, DistributedDataParallel):
        how = "DistributedDataParallel"
    elif any(isinstance(m, FSDPModule) for m in model.modules()):
        how = "FSDP (fully_shard)"
    elif any(hasattr(p, "placements") for p in model.parameters()):
        how = "DTensor (tensor parallelism)"
    if how is not None:
        raise ValueError(
            f"the model was already parallelized by {how}; autoplan.parallelize needs the plain model. Build the "
            f"model again (on device='meta' to allocate nothing) and call autoplan.parallelize once, or keep using "
            f"the ParallelModel it returned"
        )


def mark_parallelized(model: nn.Module) -> None:
    """Remember that ``model`` has been changed by ``parallelize``.

    Example:
        >>> m = torch.nn.Linear(2, 2); mark_parallelized(m); getattr(m, "_autoplan_parallelized")
        True
    """
    object.__setattr__(model, _MARK, True)


@torch.no_grad()
def agree_on_initial_weights(model: nn.Module) -> bool:
    """Compare a checksum of every parameter and buffer across ranks; when any rank differs (each built the model
    under its own seed), copy rank 0's values to every rank. Returns whether values were copied. Collective.

    Example:
        >>> agree_on_initial_weights(torch.nn.Linear(2, 2))  # a world of one
        False
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return False
    tensors = list(model.state_dict(keep_vars=True).values())
    device = tensors[0].device if tensors else torch.device("cpu")
    sums = torch.tensor([[t.double().sum().item(), t.double().abs().sum().item()] for t in tensors]
                        or [[0.0, 0.0]], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return False
    for t in tensors:
        dist.broadcast(t.data, src=0)
    return True


def check_batch_norm(model: nn.Module, dp: int, microbatches: int, device_type: str) -> bool:
    """Batch normalization under data parallelism: allowed on CUDA with one microbatch, where ``parallelize``
    converts it to ``SyncBatchNorm`` over the data-parallel group (statistics over the global batch, as one
    process); refused otherwise (CPU, or statistics per microbatch). Returns whether to convert.

    Example:
        >>> check_batch_norm(torch.nn.Sequential(torch.nn.BatchNorm1d(2)), dp=1, microbatches=1, device_type="cpu")
        False
    """
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or (dp == 1 and microbatches == 1):
        return False
    if microbatches > 1 or device_type != "cuda":
        why = (f"{microbatches} microbatches each normalize over their own samples" if microbatches > 1 else
               "torch's SyncBatchNorm, which would share statistics over the data-parallel ranks, needs CUDA")
        raise ValueError(
            f"the model has batch normalization ({norms[:3]}) and the plan splits each batch (dp={dp}, "
            f"microbatches={microbatches}): {why}, so training would not match one process. Replace BatchNorm by "
            f"GroupNorm/LayerNorm, or re-plan with mesh={{'dp': 1}} and microbatch_size equal to the global batch"
            f"{' (on CUDA, dp > 1 with one microbatch uses SyncBatchNorm)' if device_type != 'cuda' else ''}"
        )
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise ValueError("the model's root module is a BatchNorm layer; wrap it in a container module")
    return True


# id → weak reference of parameters that parallelize replaced (the rank now trains another tensor under that name).
_replaced: dict[int, tuple[weakref.ref, str]] = {}
_hook_handle = None


def _optimizer_pre_hook(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            entry = _replaced.get(id(param))
            if entry is not None and entry[0]() is param:
                raise ValueError(
                    f"this optimizer holds parameter {entry[1]!r} as it was before autoplan.parallelize replaced it "
                    f"with this rank's shard, so its step() would never change the trained model; build the "
                    f"optimizer after parallelize over pm.parameters()"
                )


def watch_replaced_parameters(before: Iterable[tuple[str, nn.Parameter]], after: dict[str, torch.Tensor]) -> int:
    """Remember the parameters of ``before`` (name, parameter before parallelize) that ``after`` (this rank's
    tensors by name) holds under the same name as another tensor; any optimizer's ``step()`` over one of them
    raises. Returns how many are watched.

    Example:
        >>> old = torch.nn.Parameter(torch.zeros(1))
        >>> watch_replaced_parameters([("w", old)], {"w": torch.nn.Parameter(torch.zeros(1))})
        1
        >>> try:
        ...     torch.optim.SGD([old], lr=0.1).step()
        ... except ValueError as e:
        ...     print(str(e)[:48])
        this optimizer holds parameter 'w' as it was bef
    """
    global _hook_handle
    count = 0
    for name, param in before:
        if name in after and after[name] is not param:
            _replaced[id(param)] = (weakref.ref(param, lambda _, key=id(param): _replaced.pop(key, None)), name)
            count += 1
    if count and _hook_handle is None:
        _hook_handle = register_optimizer_step_pre_hook(_optimizer_pre_hook)
    return count


def check_ddp_gradients(named_parameters: Iterable[tuple[str, nn.Parameter]]) -> None:
    """After a step under classic DDP: every trainable parameter must have a gradient (DDP would fail in the next
    step with its own error otherwise).

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> try:
        ...     check_ddp_gradients(lin.named_parameters())
        ... except ValueError as e:
        ...     print(str(e)[:42])
        parameters ['weight', 'bias'] got no gradi
    """
    missing = [name for name, p in named_parameters if p.requires_grad and p.grad is None]
    if missing:
        raise ValueError(
            f"parameters {missing[:5]} got no gradient in this step (unused in forward) and the plan uses DDP, "
            f"which needs a gradient for every trainable parameter; freeze them with p.requires_grad_(False) "
            f"before autoplan.parallelize, or re-plan with data_parallel='fsdp'"
        )
