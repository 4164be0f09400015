"""Full (unsharded) weights in and out of a parallelized model: a state dict with the original names scattered into
each rank's shards, Hugging Face ``safetensors`` files read tensor by tensor, and one ``safetensors`` file written
for inference.

- :func:`load_full_state_dict`: ``state_dict`` on every rank (each cuts its shards locally), or on rank 0 with
  ``None`` elsewhere (rank 0 broadcasts one tensor at a time). Any layout: tensor, pipeline, data parallel, tied
  weights (a tied group needs one of its names; Hugging Face files usually keep only the embedding).
- :func:`load_safetensors`: a ``model.safetensors`` file, a ``model.safetensors.index.json`` index, or a folder
  holding either; every rank opens the files and reads only the tensors it holds, one at a time, so no process
  ever holds the whole checkpoint.
- :func:`save_safetensors`: ``full_state_dict()`` written by rank 0 as one file (each tied group once).

Example (a world of one):
    >>> import torch, autoplan, tempfile, os
    >>> from autoplan.execute.manual import manual_plan
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> pm = autoplan.parallelize(model, plan=manual_plan(model, [["0"]], global_batch_size=2))
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> autoplan.save_safetensors(pm, path)
    >>> with torch.no_grad():
    ...     _ = model[0].weight.zero_()
    >>> autoplan.load_safetensors(pm, path)
    >>> bool(model[0].weight.abs().sum() > 0)
    True
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from .guards import fail_together
from .materialize import copy_full_into, held_tensors

__all__ = ["load_full_state_dict", "load_safetensors", "save_safetensors"]


def _alias_of(tied: list[list[str]]) -> dict[str, list[str]]:
    return {name: names for names in tied for name in names}


def _resolve(state_keys: list[str], tied: list[list[str]], available: set[str]) -> tuple[dict[str, str], list[str]]:
    """For each model key, the key of ``available`` to read it from (itself, or a tied alias); and what is missing."""
    aliases = _alias_of(tied)
    source, missing = {}, []
    for key in state_keys:
        found = next((k for k in [key] + aliases.get(key, []) if k in available), None)
        if found is None:
            missing.append(key)
        else:
            source[key] = found
    return source, missing


def _check(state_keys: list[str], tied: list[list[str]], available: set[str], what: str) -> dict[str, str]:
    source, missing = _resolve(state_keys, tied, available)
    unexpected = sorted(available - set(state_keys))
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the model: missing {missing[:5]}{' …' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{' …' if len(unexpected) > 5 else ''} (of {len(state_keys)} model keys); it is for "
            f"another model or configuration — rename its keys with key_map= or build the model it was saved from"
        )
    return source


def _held(pm) -> dict[str, torch.Tensor]:
    return held_tensors(pm.modules_on_rank)


@torch.no_grad()
def load_full_state_dict(pm, state_dict: dict[str, torch.Tensor] | None) -> None:
    """Copy a full state dict (original names) into this rank's tensors and shards. Collective: every rank calls it,
    with the dict, or rank 0 with the dict and the others with ``None``.

    Example: ``pm.load_state_dict(torch.load("full.pt") if rank == 0 else None)``
    """
    a = pm._ready()
    held = _held(pm)
    with fail_together("load_state_dict"):
        everywhere = state_dict is not None
        if a.world.distributed:
            flags = [None] * a.world.size
            dist.all_gather_object(flags, everywhere)
            everywhere = all(flags)
            if not everywhere and not flags[0]:
                raise ValueError("load_state_dict needs the state dict on rank 0 (and on every rank, or None on "
                                 "the others); rank 0 passed None")
        if everywhere:
            if not isinstance(state_dict, dict):
                raise ValueError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
            source = _check(a.state_keys, a.tied, set(state_dict), "the state dict")
            for key, src in source.items():
                if key in held:
                    copy_full_into(held[key], state_dict[src], key)
        else:
            _broadcast_from_rank0(a, held, state_dict)
    a.uninitialized = False


def _broadcast_from_rank0(a, held: dict[str, torch.Tensor], state_dict: dict | None) -> None:
    box: list = [None]
    if a.world.rank == 0:
        try:
            source = _check(a.state_keys, a.tied, set(state_dict), "the state dict")
            box[0] = [(key, source[key], tuple(state_dict[source[key]].shape), state_dict[source[key]].dtype)
                      for key in a.state_keys]
        except ValueError as exc:
            box[0] = str(exc)
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise ValueError(box[0])
    for key, src, shape, dtype in box[0]:
        if a.world.rank == 0:
            full = state_dict[src].to(a.device, dtype)
        else:
            full = torch.empty(shape, dtype=dtype, device=a.device)
        dist.broadcast(full, src=0)  # one tensor at a time: no rank ever holds the whole model twice
        if key in held:
            copy_full_into(held[key], full, key)


def _safetensors_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors.index.json", "model.safetensors"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise ValueError(f"{path} holds neither model.safetensors nor model.safetensors.index.json")
    if not path.exists():
        raise ValueError(f"no such file: {path}")
    if path.name.endswith(".json"):
        weight_map = json.loads(path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path} is not a safetensors index (no 'weight_map')")
        return [path.parent / name for name in dict.fromkeys(weight_map.values())]
    return [path]


def _keys_in(files: list[Path]) -> Iterator[tuple[Path, str]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield file, key


@torch.no_grad()
def load_safetensors(pm, path: str | Path, key_map: Callable[[str], str] | None = None) -> None:
    """Load a Hugging Face ``model.safetensors`` (file, index, or folder) into ``pm``, one tensor at a time; each
    rank reads only the tensors it holds. ``key_map`` renames the file's keys to the model's (e.g. drop a prefix)
    and returns ``None`` for keys to skip. Collective: call it on every rank.

    Example: ``autoplan.load_safetensors(pm, "Llama-3-8B/")`` (see the module docstring for a runnable one)
    """
    from safetensors import safe_open

    a = pm._ready()
    held = _held(pm)
    with fail_together("load_safetensors"):
        files = _safetensors_files(path)
        located = {}
        for file, key in _keys_in(files):
            name = key_map(key) if key_map else key
            if name is not None:  # key_map returns None for keys to skip
                located[name] = (file, key)
        source = _check(a.state_keys, a.tied, set(located), f"{path}")
        wanted: dict[Path, list[tuple[str, str]]] = {}
        for key, src in source.items():
            if key in held:
                file, file_key = located[src]
                wanted.setdefault(file, []).append((key, file_key))
        for file, pairs in wanted.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key, file_key in pairs:
                    copy_full_into(held[key], f.get_tensor(file_key), key)
    if a.world.distributed:
        dist.barrier()
    a.uninitialized = False


def save_safetensors(pm, path: str | Path) -> None:
    """Write the unsharded weights as one ``safetensors`` file on rank 0 (each tied group under its first name, as
    Hugging Face does); for inference and export. Collective: call it on every rank.

    Example: ``autoplan.save_safetensors(pm, "out/model.safetensors")``
    """
    from safetensors.torch import save_file

    a = pm._ready()
    state = pm.full_state_dict()
    if a.world.rank == 0:
        later_aliases = {name for names in a.tied for name in names[1:]}
        tensors = {k: v.contiguous() for k, v in state.items() if k not in later_aliases}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"format": "pt"})
    if a.world.distributed:
        dist.barrier()
