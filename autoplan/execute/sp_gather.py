"""Megatron's storage under sequence parallelism: a colwise linear keeps its input's sequence shard for backward,
not the all-gathered input, and gathers it again when its weight gradient needs it.

Under sequence parallelism (:mod:`autoplan.execute.tensor_parallel`) each colwise linear of a pair reads the
residual stream's norm output, a DTensor sharded on the sequence, ``Shard(1)``, gathered whole before the matmul.
Left to DTensor (``ColwiseParallel(input_layouts=Shard(1))``), every colwise linear gathers that input itself and
autograd keeps the gathered, whole tensor for the weight gradient: q, k and v each gather, and the block keeps
s·b·h per pair where Megatron keeps s·b·h/t (Korthikanti et al. 2022 §4.2.2: Megatron-LM's
``LinearWithGradAccumulationAndAsyncCommunication`` saves the shard and all-gathers it again in backward,
overlapped with the input-gradient GEMM). Here, per sequence-parallel layer:

* **one gather per shared input**: a forward pre-hook on each colwise linear gathers a ``Shard(1)`` input once and
  hands the same replicated DTensor to every colwise linear that reads that input (q, k, v; gate, up), until the
  pair's rowwise linear runs (or the layer returns); autograd sums their partial input gradients before the single
  reduce-scatter of the gather's backward;
* **the shard saved**: each colwise linear's forward runs under ``torch.autograd.graph.saved_tensors_hooks`` whose
  pack hook turns every saved tensor that views the gathered storage (the matmul's flattened input) into a
  reference to the shard, and whose unpack hook gathers the shard again — once per shared input and backward: the
  linears reading it share that gather, which is dropped when the last of them has unpacked it;
* **under recompute** (a checkpoint around the linear: the layer recomputed whole, or any module holding the
  linear) the checkpoint already keeps nothing of the region, so the hooks step aside (a checkpoint's own
  saved-tensor hooks are active) and the recomputation gathers once per shared input, as in forward;
* **under autocast** the shard is cast to the autocast dtype before it is gathered, as autocast would cast the
  gathered input in the matmul (the same values): the saved view is then the gathered tensor itself, not a cast copy,
  and the gather moves the low-precision bytes the cost model charges.

Nothing here changes a value: the gathered tensor in backward is the forward's, bit for bit, so gradients equal
DTensor's own path (tests/test_sequence_parallel.py and the sequence-parallel layouts of the executor worlds check
them against one process). What autoplan charges for it is in :mod:`autoplan.cost.sequence`.

Example (with one rank the gather is a copy; the linear saves the shard's view):
    >>> import torch, torch.distributed as dist
    >>> from torch.distributed.device_mesh import init_device_mesh
    >>> from torch.distributed.tensor import DTensor, Shard
    >>> from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    >>> from torch.testing._internal.distributed.fake_pg import FakeStore
    >>> dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    >>> mesh = init_device_mesh("cpu", (1,))
    >>> block = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> _ = parallelize_module(block[0], mesh, ColwiseParallel())
    >>> keep_colwise_inputs_sharded(block, ["0"], ["2"], [""])
    1
    >>> x = DTensor.from_local(torch.randn(2, 3, 4), mesh, (Shard(1),)).requires_grad_()
    >>> block(x).sum().backward()
    >>> dist.destroy_process_group()
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

__all__ = ["keep_colwise_inputs_sharded"]

#: The residual stream's sequence dim inside a sequence-parallel layer (inputs are (batch, sequence, hidden));
#: :mod:`autoplan.execute.tensor_parallel` shards and gathers on it too.
SEQUENCE_DIM = 1


class _Gather:
    """One gathered colwise input: the shard autograd keeps in its place, and its gather made again in backward
    while some saved view of it waits to be unpacked."""

    __slots__ = ("shard", "layout", "packs", "unpacks", "again")

    def __init__(self, shard: DTensor, full: torch.Tensor):
        self.shard = shard.detach()
        self.layout = (full.size(), full.stride(), full.storage_offset())
        self.packs = 0
        self.unpacks = 0
        self.again: torch.Tensor | None = None

    def gathered(self) -> torch.Tensor:
        """The whole local tensor, laid out as in forward (gathered again at the first unpack of a backward)."""
        if self.again is None:
            with torch.no_grad():
                full = self.shard.redistribute(self.shard.device_mesh, (Replicate(),)).to_local()
                size, stride, _ = self.layout
                if full.size() != size or full.stride() != stride:
                    full = torch.empty_strided(size, stride, dtype=full.dtype, device=full.device).copy_(full)
            self.again = full
        return self.again


class _SavedView:
    """What the pack hook keeps for a saved tensor that views a gathered input: where in it, not its bytes."""

    __slots__ = ("gather", "spec", "size", "stride", "offset")

    def __init__(self, gather: _Gather, saved: DTensor):
        local = saved._local_tensor
        self.gather, self.spec = gather, saved._spec
        self.size, self.stride = local.size(), local.stride()
        self.offset = local.storage_offset() - gather.layout[2]

    def unpack(self) -> DTensor:
        gather = self.gather
        full = gather.gathered()
        local = full.as_strided(self.size, self.stride, full.storage_offset() + self.offset)
        gather.unpacks += 1
        if gather.unpacks >= gather.packs:  # the last saved view of it: a later backward gathers anew
            gather.again, gather.unpacks = None, 0
        return DTensor(local, self.spec, requires_grad=False)


class _Gathers:
    """The gathers of one module tree's sequence-parallel layers: the current shared input (a slot reused while
    the same shard comes again), and the live gathered storages the pack hook recognises."""

    def __init__(self):
        self.key: DTensor | None = None
        self.version = -1
        self.full: DTensor | None = None
        self.live: dict[int, tuple[weakref.ref, _Gather]] = {}

    def clear(self, *_) -> None:
        self.key, self.version, self.full = None, -1, None

    def gather(self, module: nn.Module, args: tuple):
        """Forward pre-hook of a colwise linear: its ``Shard(1)`` input gathered, once per shared input."""
        x = args[0] if args else None
        if not isinstance(x, DTensor) or x.placements != (Shard(SEQUENCE_DIM),):
            return None  # a whole input (cross-attention's encoder states): nothing to gather
        if self.key is x and self.version == x._version:
            return (self.full,) + tuple(args[1:])
        shard = x
        device = x.device.type
        if torch.is_autocast_enabled(device) and x.is_floating_point():
            low = torch.get_autocast_dtype(device)
            if x.dtype != low:
                shard = x.to(low)
        full = shard.redistribute(shard.device_mesh, (Replicate(),))
        local = full._local_tensor
        record = _Gather(shard, local)
        storage = local.untyped_storage().data_ptr()
        self.live[storage] = (weakref.ref(local, functools.partial(self._forget, storage)), record)
        self.key, self.version, self.full = x, x._version, full
        return (full,) + tuple(args[1:])

    def _forget(self, storage: int, ref: weakref.ref) -> None:
        entry = self.live.get(storage)
        if entry is not None and entry[0] is ref:
            del self.live[storage]

    def pack(self, saved: torch.Tensor):
        if not isinstance(saved, DTensor):
            return saved
        local = saved._local_tensor
        entry = self.live.get(local.untyped_storage().data_ptr())
        if entry is None or entry[0]() is None or entry[0]().dtype != local.dtype:
            return saved
        record = entry[1]
        record.packs += 1
        return _SavedView(record, saved)

    @staticmethod
    def unpack(packed):
        return packed.unpack() if isinstance(packed, _SavedView) else packed


def _forward_saving_shards(forward, gathers: _Gathers, *args, **kwargs):
    # A checkpoint around this linear (recompute) has its own hooks active and keeps nothing of the region: leave
    # the saving to it (the innermost hooks would take the tensors from it).
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return forward(*args, **kwargs)
    with torch.autograd.graph.saved_tensors_hooks(gathers.pack, gathers.unpack):
        return forward(*args, **kwargs)


def keep_colwise_inputs_sharded(root: nn.Module, colwise: list[str], rowwise: list[str], layers: list[str]) -> int:
    """Give the colwise linears ``colwise`` (FQNs in ``root``, of sequence-parallel layers, already parallelized
    with ``input_layouts=Replicate()``) Megatron's storage: one gather per shared input in forward, the shard saved,
    one gather again per shared input in backward. ``rowwise`` (the pairs' rowwise linears) and ``layers`` (the
    sequence-parallel layers) end a shared input's reuse. Returns how many linears were changed.

    Example: see the module docstring.
    """
    if not colwise:
        return 0
    gathers = _Gathers()
    for fqn in colwise:
        module = root.get_submodule(fqn)
        module.register_forward_pre_hook(gathers.gather, prepend=True)
        module.forward = functools.partial(_forward_saving_shards, module.forward, gathers)
    for fqn in rowwise:
        root.get_submodule(fqn).register_forward_pre_hook(gathers.clear)
    for fqn in layers:
        root.get_submodule(fqn).register_forward_hook(gathers.clear)
    return len(colwise)
