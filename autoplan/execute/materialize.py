"""Models built on the meta device: each rank allocates only what it holds, then initializes it.

After tensor parallelism, pipeline splitting and FSDP/DDP have been applied to a model whose tensors are on meta,
:func:`materialize` calls ``to_empty`` on this rank's stage modules (so a rank allocates its shards, never the whole
model) and fills them with :func:`init_weights_by_module`:

- ``init_weights(module)`` (default: the model's own ``_init_weights(module)`` for a Hugging Face transformers model —
  its config's ``initializer_range``, norms to one, rotary tables recomputed — else ``module.reset_parameters()``)
  runs once per module that owns tensors this rank
  holds, in ``model.apply`` order (children first). It runs on a full-size CPU copy of that module's own tensors
  (the rest of the model stays on meta), under a seed derived from one job-wide seed and the module's name; the
  rank then keeps its shard of the result. So every rank that holds a copy of a replicated tensor gets the same
  values, and the values depend on the seed and the module's name only — not on the layout, the world size or any
  rank's own seed. The job-wide seed is drawn from rank 0's default generator (``torch.manual_seed`` on rank 0
  sets it). Peak extra memory is the largest module's own tensors at full size, once.
- A floating tensor that ``init_weights`` leaves untouched is caught (copies start as NaN) and raises
  ``ValueError`` naming it, rather than training from uninitialized memory.
- ``init_weights=False`` leaves the memory uninitialized for :meth:`ParallelModel.load_state_dict` or
  :meth:`ParallelModel.load_checkpoint`; training before one of them raises.

Example:
    >>> import torch
    >>> from autoplan.execute.materialize import on_meta, init_weights_by_module
    >>> with torch.device("meta"):
    ...     model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> on_meta(model)
    True
    >>> model.to_empty(device="cpu")  # doctest: +ELLIPSIS
    Sequential(...)
    >>> with torch.device("meta"):
    ...     reference = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> init_weights_by_module(reference, dict(model.named_parameters()), None, seed=7)
    >>> bool(torch.isfinite(model[0].weight).all())
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["on_meta", "check_loadable", "held_tensors", "copy_full_into", "init_weights_by_module", "shared_seed", "retie"]


def on_meta(model: nn.Module) -> bool:
    """Whether ``model``'s tensors are on the meta device; a model with some tensors on meta and some elsewhere is
    refused (its real tensors would be lost when the rest is allocated).

    Example:
        >>> on_meta(torch.nn.Linear(2, 2))
        False
    """
    tensors = list(model.parameters()) + list(model.buffers())
    meta = [t.device.type == "meta" for t in tensors]
    if any(meta) and not all(meta):
        names = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type != "meta"]
        raise ValueError(
            f"the model has tensors on the meta device and others elsewhere ({names[:5]} are not on meta); build the "
            f"whole model under `with torch.device('meta'):` (autoplan then allocates each rank's part), or none of it"
        )
    return any(meta)


def check_loadable(model: nn.Module) -> None:
    """``init_weights=False`` on a meta model: every tensor must come from a state dict, so the model must have no
    non-persistent buffers (state dicts do not carry them; they would stay uninitialized memory).

    Example:
        >>> check_loadable(torch.nn.BatchNorm1d(2))  # its buffers are persistent
    """
    persistent = set(model.state_dict(keep_vars=True))
    transient = [name for name, _ in model.named_buffers() if name not in persistent]
    if transient:
        raise ValueError(
            f"init_weights=False leaves the weights to a state dict or checkpoint, but buffers {transient[:5]} are "
            f"not saved in state dicts (persistent=False) and would stay uninitialized; pass init_weights=fn (it "
            f"sets them; loading then overwrites the parameters) instead of False"
        )


def held_tensors(modules: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of this rank's stage modules under each of its original names (tied weights under
    each name).

    Example:
        >>> sorted(held_tensors([torch.nn.Linear(2, 2)]))
        ['bias', 'weight']
    """
    held: dict[str, torch.Tensor] = {}
    for module in modules:
        for name, tensor in module.named_parameters(remove_duplicate=False):
            held.setdefault(name, tensor)
        for name, tensor in module.named_buffers(remove_duplicate=False):
            held.setdefault(name, tensor)
    return held


@torch.no_grad()
def copy_full_into(target: torch.Tensor, full: torch.Tensor, name: str = "tensor") -> None:
    """Copy the unsharded value ``full`` into ``target``: the whole tensor, or this rank's shard of a DTensor (cut
    locally with ``distribute_tensor(..., src_data_rank=None)``: no communication).

    Example:
        >>> t = torch.zeros(2)
        >>> copy_full_into(t, torch.ones(2)); t
        tensor([1., 1.])
    """
    if tuple(full.shape) != tuple(target.shape):
        raise ValueError(f"{name}: the given tensor has shape {tuple(full.shape)} but the model's is "
                         f"{tuple(target.shape)}; the state dict is for another model configuration")
    if hasattr(target, "placements"):
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(full.to(device=target.device, dtype=target.dtype), target.device_mesh, target.placements,
                                  src_data_rank=None).to_local()
        target.to_local().copy_(local)
    else:
        target.copy_(full)


def retie(modules: list[nn.Module], tied: list[list[str]]) -> None:
    """Make the names of each tied group that this rank holds point at one parameter again (``to_empty`` allocates
    each name separately).

    Example:
        >>> m = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)})
        >>> retie([m], [["a.weight", "b.weight"]]); m.a.weight is m.b.weight
        True
    """
    for module in modules:
        params = dict(module.named_parameters(remove_duplicate=False))
        for names in tied:
            present = [n for n in names if n in params]
            for name in present[1:]:
                owner, _, leaf = name.rpartition(".")
                setattr(module.get_submodule(owner) if owner else module, leaf, params[present[0]])


def shared_seed(distributed: bool) -> int:
    """One seed for the whole job: drawn from rank 0's default generator and broadcast.

    Example:
        >>> _ = torch.manual_seed(0); a = shared_seed(False)
        >>> _ = torch.manual_seed(0); a == shared_seed(False)
        True
    """
    seed = int(torch.randint(0, 2**62, (1,)).item())
    if distributed:
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = box[0]
    return seed


def _module_seed(seed: int, fqn: str) -> int:
    digest = hashlib.sha256(f"{seed}:{fqn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _post_order(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}{name}.")
    yield prefix[:-1], module


def _default_init(module: nn.Module) -> None:
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


def _model_default_init(reference: nn.Module) -> Callable[[nn.Module], None]:
    """transformers' ``PreTrainedModel._init_weights`` covers modules without ``reset_parameters`` (RMSNorm, rotary
    tables) and initializes as the library does when it builds a model on CPU; other models: ``reset_parameters``."""
    hf_init = getattr(reference, "_init_weights", None)
    if callable(hf_init) and hasattr(reference, "config"):
        return hf_init
    return _default_init


@torch.no_grad()
def init_weights_by_module(reference: nn.Module, held: dict[str, torch.Tensor], init_weights: Callable | None,
                           seed: int) -> None:
    """Initialize the tensors in ``held`` (name → this rank's tensor or shard) from ``reference``, an untouched copy
    of the model on meta: see the module docstring.

    Example: see the module docstring.
    """
    fn = init_weights or _model_default_init(reference)
    aliases: dict[int, list[str]] = {}
    for name, t in list(reference.named_parameters(remove_duplicate=False)) + list(
            reference.named_buffers(remove_duplicate=False)):
        aliases.setdefault(id(t), []).append(name)
    done: set[str] = set()
    for fqn, module in _post_order(reference):
        own = {**{k: v for k, v in module._parameters.items() if v is not None},
               **{k: v for k, v in module._buffers.items() if v is not None}}
        names = {leaf: aliases.get(id(t), []) for leaf, t in own.items()}
        if not any(n in held for ns in names.values() for n in ns):
            continue
        module.to_empty(device="cpu", recurse=False)
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is not None:
                t.fill_(float("nan") if t.is_floating_point() else 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_module_seed(seed, fqn))
            fn(module)
        for leaf, full_names in names.items():
            value = module._parameters.get(leaf)
            value = module._buffers.get(leaf) if value is None else value
            if value.is_floating_point() and bool(torch.isnan(value).any()):
                what = ("init_weights" if init_weights else f"{type(reference).__name__}._init_weights"
                        if fn is not _default_init else f"{type(module).__name__}.reset_parameters()")
                raise ValueError(
                    f"{what} left {full_names[0]!r} (or part of it) uninitialized on module {fqn or 'the root'!r} "
                    f"of a model built on meta; pass autoplan.parallelize(..., init_weights=fn) with fn(module) "
                    f"setting every parameter and buffer module owns, or init_weights=False and then "
                    f"pm.load_state_dict(...) / pm.load_checkpoint(...)"
                )
            for name in full_names:
                if name in held:
                    copy_full_into(held[name], value, name)
                    done.add(name)
        module.to_empty(device="meta", recurse=False)  # free the full-size copy before the next module
    missing = sorted(set(held) - done)
    if missing:
        raise ValueError(f"no module of the model owns {missing[:5]}; they cannot be initialized")
