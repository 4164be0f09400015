"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP): model and optimizer state, sharded, each rank
writing its own part, loadable under any other plan and world size.

The checkpoint is one flat state dict keyed by the model's original names:

- ``model.<name>``: every parameter and persistent buffer this rank holds, as it holds it (a DTensor shard under
  tensor parallelism or FSDP, a whole tensor otherwise). DCP records each tensor's global shape and the chunks
  written, and on load reads the chunks each rank's new layout needs — dp ↔ fsdp ↔ tp ↔ pp ↔ hybrids.
- ``optim.<name>.<state>`` (e.g. ``exp_avg``, ``step``) and ``optim_group.<name>`` (the options of its group:
  ``lr`` …): the optimizer's state per parameter, by name, so that it follows the parameter to whichever rank
  holds it next.
- Weights tied in the model (a GPT's embedding and head) are written under every name of the group, so that a
  layout that holds only one of the names (a pipeline stage) finds it.
- A fused projection sharded part by part (``colwise:K``) is written whole, in its original order (see
  :func:`_writable`), and read whole before each rank keeps its parts.
- ``extra``: any picklable object (the step count, the data loader's position, the LR scheduler's state).
  Non-tensor values are stored pickled (DCP would otherwise split dicts into keys of their own).

``save(..., async_save=True)`` returns DCP's future; the state is staged first, so training may go on. Wait for
the future (``.result()``) before the next save.

Example (a world of one):
    >>> import torch, autoplan, tempfile
    >>> from autoplan.execute.manual import manual_plan
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> pm = autoplan.parallelize(model, plan=manual_plan(model, [["0"]], global_batch_size=2))
    >>> opt = torch.optim.AdamW(pm.parameters(), lr=0.1)
    >>> _ = pm.train_step(torch.randn(2, 4), torch.randn(2, 4)); opt.step(); opt.zero_grad()
    >>> path = tempfile.mkdtemp()
    >>> pm.save_checkpoint(path, optimizer=opt, extra={"step": 1})
    >>> saved = model[0].weight.detach().clone()
    >>> _ = pm.train_step(torch.randn(2, 4), torch.randn(2, 4)); opt.step(); opt.zero_grad()
    >>> pm.load_checkpoint(path, optimizer=opt)
    {'step': 1}
    >>> torch.equal(model[0].weight, saved)
    True
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import _init_optim_state

from .guards import fail_together
from .materialize import copy_full_into, held_tensors
from .tp_styles import strided

__all__ = ["save", "load"]


def _aliases(a) -> dict[str, list[str]]:
    return {name: names for names in a.tied for name in names}


def _model_entries(pm) -> dict[str, torch.Tensor]:
    a = pm._ready()
    keys = set(a.state_keys)
    return {name: t for name, t in held_tensors(pm.modules_on_rank).items() if name in keys}


def _param_names(pm) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for module in pm.modules_on_rank:
        for name, param in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), [])
            if name not in names[id(param)]:
                names[id(param)].append(name)
    return names


def _optimizer_entries(pm, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    names = _param_names(pm)
    entries: dict[str, Any] = {}
    for group in optimizer.param_groups:
        options = {k: v for k, v in group.items() if k != "params"}
        for param in group["params"]:
            if id(param) not in names:
                raise ValueError(
                    "the optimizer holds a parameter that is not one of this ParallelModel's (pm.parameters()); "
                    "build the optimizer over pm.parameters() after autoplan.parallelize"
                )
            for name in names[id(param)]:
                entries[f"optim_group.{name}"] = pickle.dumps(options)
                for state, value in optimizer.state.get(param, {}).items():
                    entries[f"optim.{name}.{state}"] = value
    return entries


def _with_aliases(a, entries: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """Add every tied name of each entry (the checkpoint then serves layouts that hold only one of them)."""
    aliases = _aliases(a)
    out = dict(entries)
    for key, value in entries.items():
        for prefix in prefixes:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            for name, names in aliases.items():
                if rest == name or rest.startswith(name + "."):
                    for other in names:
                        out.setdefault(prefix + other + rest[len(name):], value)
    return out


def _writable(value: Any) -> Any:
    """What DCP writes for ``value``: itself, or the whole tensor of a fused projection's part-by-part shard
    (``_StridedShard``: a rank's rows are several chunks of the global tensor, which DCP's one-chunk-per-rank
    metadata cannot describe). Every tp rank then offers the same whole tensor and DCP writes it once, in the
    original order, so the checkpoint loads under any layout; it costs one gather of that tensor at save time."""
    return value.full_tensor() if strided(value) else value


def save(pm, path: str | Path, optimizer: torch.optim.Optimizer | None = None, extra: Any = None,
         async_save: bool = False):
    """Write a sharded checkpoint of ``pm`` (and ``optimizer``) to the folder ``path``. Collective.

    Example: see the module docstring.
    """
    a = pm._ready()
    with fail_together("save_checkpoint"):
        entries = {f"model.{k}": v for k, v in _model_entries(pm).items()}
        if optimizer is not None:
            entries.update(_optimizer_entries(pm, optimizer))
        entries = _with_aliases(a, entries, ("model.", "optim.", "optim_group."))
        entries = {k: _writable(v) for k, v in entries.items()}
        entries["extra"] = pickle.dumps(extra)
        entries["autoplan_checkpoint"] = pickle.dumps(
            {"version": 1, "optimizer": type(optimizer).__name__ if optimizer is not None else None})
        if async_save:
            return dcp.async_save(entries, checkpoint_id=str(path))
        dcp.save(entries, checkpoint_id=str(path))
    return None


def load(pm, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> Any:
    """Read a checkpoint written by :func:`save` under any plan into ``pm`` (and ``optimizer``); returns ``extra``.
    Collective.

    Example: see the module docstring.
    """
    a = pm._ready()
    with fail_together("load_checkpoint"):
        reader = dcp.FileSystemReader(str(path))
        try:
            saved = set(reader.read_metadata().state_dict_metadata)
        except FileNotFoundError as exc:
            raise ValueError(f"{path} is not a checkpoint written by pm.save_checkpoint (no DCP metadata)") from exc
        if "autoplan_checkpoint" not in saved:
            raise ValueError(f"{path} is a DCP checkpoint but not one written by pm.save_checkpoint")
        header = {"autoplan_checkpoint": b""}
        dcp.load(header, checkpoint_id=str(path))
        saved_optimizer = pickle.loads(header["autoplan_checkpoint"])["optimizer"]
        entries: dict[str, Any] = {f"model.{k}": v for k, v in _model_entries(pm).items()}
        if optimizer is not None:
            if saved_optimizer is None:
                raise ValueError(f"{path} was saved without an optimizer; call load_checkpoint(path) without one")
            if saved_optimizer != type(optimizer).__name__:
                raise ValueError(f"{path} holds the state of an optimizer of type {saved_optimizer}, not "
                                 f"{type(optimizer).__name__}; build a {saved_optimizer} over pm.parameters()")
            if not optimizer.state:  # create the state tensors DCP loads into (a zero-lr step over zero grads)
                optimizer.zero_grad(set_to_none=True)
                _init_optim_state(optimizer)
            entries.update(_optimizer_entries(pm, optimizer))
        missing = sorted(k for k in entries if k not in saved)
        if missing:
            raise ValueError(
                f"the checkpoint at {path} lacks {missing[:5]}{' …' if len(missing) > 5 else ''}; it was saved from "
                f"another model (or another optimizer type)"
            )
        entries["extra"] = b""
        # a fused projection's part-by-part shard is read whole, then cut into this rank's parts locally
        fused = {k: v for k, v in entries.items() if strided(v)}
        entries.update({k: torch.empty(tuple(v.shape), dtype=v.dtype, device=v.to_local().device)
                        for k, v in fused.items()})
        dcp.load(entries, checkpoint_id=str(path))
        for key, target in fused.items():
            copy_full_into(target, entries[key], key)
        if optimizer is not None:
            names = _param_names(pm)
            for group in optimizer.param_groups:
                if group["params"]:
                    group.update(pickle.loads(entries[f"optim_group.{names[id(group['params'][0])][0]}"]))
    a.uninitialized = False
    return pickle.loads(entries["extra"])
