"""Measure a model without running its real compute: one forward and one backward on fake tensors.

The model runs eagerly under ``FakeTensorMode`` with fake copies of its parameters swapped in by
``torch.func.functional_call`` (the user's tensors are never touched). Three recorders watch that run:

* a dispatch mode counts FLOPs of every ATen op with the formulas of ``torch.utils.flop_counter``;
* ``torch.autograd.graph.saved_tensors_hooks`` records every storage autograd keeps for backward (each storage
  once, parameters and buffers excluded), with the module active when it was first saved and the op that
  produced it;
* a torch-function mode tags every autograd node with the module and position of the forward op that made
  it, so that the backward ops (run under node pre-hooks) are charged to the same place as their forward.

Positions are indices into the stream of forward ATen ops; module call windows are ranges of positions. The
figures come back per innermost module FQN so that any grouping of modules into layers can be derived later.

Example:
    >>> import torch
    >>> from autoplan.trace.measure import measure
    >>> m = measure(torch.nn.Linear(8, 4), (torch.randn(2, 8),), {})
    >>> sum(e.flops for e in m.forward_ops)   # 2·B·in·out for the addmm
    128
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count
from torch.utils._python_dispatch import TorchDispatchMode

from .adapters import without_caches

__all__ = ["FakeKernels", "TensorSpec", "describe_tensor", "OpRecord", "SavedRecord", "ModuleCall", "Measurement",
           "measure", "per_module", "storage_key", "floating_bytes"]

aten = torch.ops.aten


def _cpu_flash_forward_flops(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(tuple(query.shape), tuple(key.shape), tuple(value.shape))


def _cpu_flash_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(tuple(grad_out.shape), tuple(query.shape), tuple(key.shape), tuple(value.shape))


def grouped_mm_flops(mat_a, mat_b, *args, **kwargs) -> int:
    """FLOPs of a grouped matmul (``torch._grouped_mm``; mixture-of-experts layers): 2 per multiply-add.

    Every row (2-D × 3-D), reduction element (2-D × 2-D) or column (3-D × 2-D) belongs to exactly one group, so
    the ragged dim counts once in full; 3-D × 3-D is a batched matmul.

    Example:
        >>> import torch
        >>> grouped_mm_flops(torch.empty(6, 4), torch.empty(3, 4, 5))   # 6 routed tokens, 3 experts, 4 → 5
        240
    """
    a, b = tuple(mat_a.shape), tuple(mat_b.shape)
    if len(a) == 2 and len(b) == 3:  # (tokens, K) × (groups, K, N): each token row meets one group
        return 2 * a[0] * a[1] * b[2]
    if len(a) == 2 and len(b) == 2:  # (M, K_total) × (K_total, N), ragged K: a weight gradient per group
        return 2 * a[0] * a[1] * b[1]
    if len(a) == 3 and len(b) == 2:  # (groups, M, K) × (K, N_total), ragged N
        return 2 * a[1] * a[2] * b[1]
    return 2 * a[0] * a[1] * a[2] * b[2]  # (groups, M, K) × (groups, K, N)


# torch.utils.flop_counter has no entry for the CPU flash-attention kernel that fake CPU tensors dispatch to;
# its FLOPs are those of every other SDPA kernel, so reuse flop_counter's own sdpa formulas. Nor has it one for
# grouped matmuls (transformers' mixture-of-experts layers, natively or by its fallback op).
_EXTRA_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
    aten._grouped_mm: grouped_mm_flops,
}


def _run(func, args, kwargs):
    """``func`` on fake tensors. The fake (meta) kernel of ``aten._grouped_mm`` accepts only bf16 while the CPU and
    CUDA kernels also take fp32: run other dtypes' shapes through bf16 and hand back the caller's dtype."""
    if func is aten._grouped_mm.default and args[0].dtype != torch.bfloat16:
        dtype = args[0].dtype
        cast = [a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        return func(*cast, **kwargs).to(dtype)
    return func(*args, **kwargs)


def op_flops(func, args, kwargs, out) -> int:
    """FLOPs of one ATen op call by ``torch.utils.flop_counter``'s formulas (0 for ops it does not count)."""
    packet = func._overloadpacket
    if packet.__name__ == "grouped_mm_fallback":  # transformers' custom op: the same product as aten._grouped_mm
        return grouped_mm_flops(*args, **kwargs)
    if packet in flop_registry:
        return int(flop_registry[packet](*args, **kwargs, out_val=out))
    if packet in _EXTRA_FLOP_FORMULAS:
        return int(_EXTRA_FLOP_FORMULAS[packet](*args, **kwargs))
    return 0


def storage_key(t: torch.Tensor) -> int:
    """Identity of the storage behind ``t`` (views share it); valid while the storage is alive."""
    return t.untyped_storage()._cdata


@dataclass(frozen=True)
class OpRecord:
    module: str  # innermost module FQN active in forward ("" = the root / outside every submodule)
    position: int  # index of the forward op (for backward ops: of the forward op that made its autograd node)
    flops: int


@dataclass(frozen=True)
class SavedRecord:
    module: str  # innermost module active when autograd first saved the storage
    position: int  # forward position at the time of saving
    producer: int  # forward position of the op that created the storage (-1: an input of the model)
    nbytes: int


@dataclass
class ModuleCall:
    start: int  # first forward position inside the module's first call
    end: int  # one past the last
    input_bytes: int  # distinct storages of the tensors passed in (what recompute keeps alive)
    order: int  # rank of the first call among all module calls
    # floating tensors passed in positionally and returned, each whole (autoplan.trace.low_precision_bytes compares
    # them with the same call run in a low precision)
    floating_input_bytes: int = 0
    floating_output_bytes: int = 0


@dataclass
class Measurement:
    forward_ops: list[OpRecord] = field(default_factory=list)
    backward_ops: list[OpRecord] = field(default_factory=list)
    saved: list[SavedRecord] = field(default_factory=list)
    # forward position of every tensor autograd saves, each save (repeats and parameters too): non-reentrant
    # checkpointing's recomputation stops at the last of a module's (see RecomputeOption.unreached)
    pack_positions: list[int] = field(default_factory=list)
    calls: dict[str, ModuleCall] = field(default_factory=dict)  # module FQN → its first call
    num_forward_ops: int = 0
    # FQN → (args, kwargs) of the first call of each module asked for, tensors described by describe_tensor
    inputs: dict[str, tuple] = field(default_factory=dict)


class _State:
    """Shared, mutable state of the three recorders."""

    def __init__(self, names: dict[int, str]):
        self.names = names  # id(module) → FQN
        self.stack: list[str] = [""]
        self.position = 0
        self.backward_tag: tuple[str, int] | None = None
        self.in_backward = False
        self.producer: dict[int, int] = {}
        self.seen_saved: set[int] = set()
        self.excluded: set[int] = set()  # parameter and buffer storages
        self.excludes_casts = False  # under autocast: its low-precision copies of them too
        self.result = Measurement()


class _DispatchRecorder(TorchDispatchMode):
    def __init__(self, state: _State):
        super().__init__()
        self.s = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _run(func, args, kwargs)
        s = self.s
        flops = op_flops(func, args, kwargs, out)
        if s.in_backward:
            module, position = s.backward_tag or ("", s.position)
            s.result.backward_ops.append(OpRecord(module, position, flops))
            return out
        s.result.forward_ops.append(OpRecord(s.stack[-1], s.position, flops))
        if s.excludes_casts and func is aten._to_copy.default and storage_key(args[0]) in s.excluded:
            # autocast's copy of a weight, which a linear saves: the cost model counts it on its own
            # (autoplan.cost.autocast_weight_copy_bytes), not as an activation
            s.excluded.add(storage_key(out))
        inputs = {storage_key(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = storage_key(t)
                if key not in inputs:  # views and in-place ops make no new storage
                    s.producer[key] = s.position
        s.position += 1
        return out


class FakeKernels(TorchDispatchMode):
    """Runs every op as :func:`_run` does, for a fake forward outside :func:`measure` (fp32 grouped matmuls).

    Example:
        >>> import torch
        >>> with FakeKernels():
        ...     torch.ones(2).sum().item()
        2.0
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class _AutogradTagger(TorchFunctionMode):
    """Tags each new autograd node with (module, position) and hooks it to set the backward attribution."""

    def __init__(self, state: _State):
        super().__init__()
        self.s = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tag = (self.s.stack[-1], max(self.s.position - 1, 0))
        pending = [t.grad_fn for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while pending:
            node = pending.pop()
            if node is None or "autoplan" in node.metadata:
                continue
            node.metadata["autoplan"] = tag
            node.register_prehook(self._make_prehook(tag))
            pending.extend(nxt for nxt, _ in node.next_functions)
        return out

    def _make_prehook(self, tag):
        state = self.s

        def prehook(grad_outputs):
            state.backward_tag = tag

        return prehook


def _fake_like(t: torch.Tensor, floating_dtype: torch.dtype | None = None) -> torch.Tensor:
    # Built inside FakeTensorMode, so no memory is allocated. Everything runs as CPU: the autograd engine runs
    # CPU backward on the calling thread, where the recorders are active, and meta inputs would pick SDPA's
    # math kernel, whose saved tensors differ from the fused kernels used in training.
    dtype = floating_dtype if floating_dtype is not None and t.is_floating_point() else t.dtype
    fake = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=dtype, device="cpu")
    if t.requires_grad:
        fake.requires_grad_(True)
    return fake


def _distinct_bytes(tree: Any) -> int:
    seen: dict[int, int] = {}
    for t in pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def per_module(m: Measurement) -> tuple[dict[str, int], dict[str, int]]:
    """Forward FLOPs and saved bytes of each module including its children (the root ``""`` holds all).

    Example:
        >>> fwd, act = per_module(measure(torch.nn.Sequential(torch.nn.Linear(8, 4)), (torch.randn(2, 8),), {}))
        >>> fwd["0"], fwd[""]
        (128, 128)
    """
    fwd: dict[str, int] = {}
    act: dict[str, int] = {}
    for table, records, attr in ((fwd, m.forward_ops, "flops"), (act, m.saved, "nbytes")):
        for rec in records:
            value = getattr(rec, attr)
            if not value:
                continue
            probe = rec.module
            while True:
                table[probe] = table.get(probe, 0) + value
                if probe == "":
                    break
                probe = probe.rpartition(".")[0]
    return fwd, act


def floating_bytes(tree: Any) -> int:
    """Bytes of the floating tensors in ``tree``, each tensor as large as it is (views whole, repeats again).

    Example:
        >>> floating_bytes((torch.zeros(2, 3), torch.zeros(4, dtype=torch.long), [torch.ones(1).bfloat16()]))
        26
    """
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(tree)
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def fake_state(model: torch.nn.Module, param_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Fake copies of every parameter and buffer under all of its names (tied tensors stay tied), the floating
    parameters in ``param_dtype`` when given (buffers keep theirs, as under FSDP2's mixed precision).

    Must be called inside an active ``FakeTensorMode``.
    """
    fakes: dict[int, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    params = model.named_parameters(remove_duplicate=False)
    named = [(n, t, param_dtype) for n, t in params] + [(n, t, None) for n, t in
                                                         model.named_buffers(remove_duplicate=False)]
    for name, t, dtype in named:
        if id(t) not in fakes:
            fakes[id(t)] = _fake_like(t, dtype)
        state[name] = fakes[id(t)]
    return state


def fake_inputs(args: tuple, kwargs: dict, floating_dtype: torch.dtype | None = None) -> tuple[tuple, dict]:
    """Fake copies of the example inputs (same shapes, dtypes, strides; floating ones in ``floating_dtype`` when
    given); call inside ``FakeTensorMode``."""
    def conv(x):
        return _fake_like(x, floating_dtype) if isinstance(x, torch.Tensor) else x

    return pytree.tree_map(conv, args), pytree.tree_map(conv, kwargs)


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor seen on fake tensors (its values are unknown)."""

    shape: tuple
    dtype: torch.dtype


def describe_tensor(x: Any) -> Any:
    """A :class:`TensorSpec` for a tensor, anything else unchanged.

    Example:
        >>> describe_tensor(torch.zeros(2, 3))
        TensorSpec(shape=(2, 3), dtype=torch.float32)
    """
    return TensorSpec(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x


def measure(model: torch.nn.Module, args: tuple, kwargs: dict, record_inputs: set[str] = frozenset(),
            autocast_dtype: torch.dtype | None = None, param_dtype: torch.dtype | None = None) -> Measurement:
    """Run ``model(*args, **kwargs)`` and its backward on fake tensors, recording FLOPs and saved storages (and
    the inputs of the first call of each module named in ``record_inputs``). With ``autocast_dtype``, the forward
    alone, under CPU autocast to that dtype, autocast's copies of the weights not counted as saved; with
    ``param_dtype``, the forward alone with the floating parameters and inputs in that dtype and the buffers as
    they are, as FSDP2's ``MixedPrecisionPolicy`` runs it (:mod:`autoplan.trace.low_precision_bytes`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.modules import module as module_mod

    names: dict[int, str] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), name)
    s = _State(names)

    def pre_hook(mod, inputs):
        name = s.names.get(id(mod))
        if name is None:
            return
        s.stack.append(name)
        if name not in s.result.calls:
            s.result.calls[name] = ModuleCall(s.position, s.position, _distinct_bytes(inputs), len(s.result.calls),
                                              floating_input_bytes=floating_bytes(inputs))

    def post_hook(mod, inputs, output):
        name = s.names.get(id(mod))
        if name is None:
            return
        if s.stack[-1] == name:
            s.stack.pop()
        call = s.result.calls[name]
        if call.end == call.start:
            call.end = s.position
            call.floating_output_bytes = floating_bytes(output)

    def pack(t: torch.Tensor):
        s.result.pack_positions.append(s.position)
        key = storage_key(t)
        if key not in s.seen_saved and key not in s.excluded:
            s.seen_saved.add(key)
            s.result.saved.append(
                SavedRecord(s.stack[-1], s.position, s.producer.get(key, -1), t.untyped_storage().nbytes())
            )
        return t

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    handles = []
    try:
        with fake_mode:
            state = fake_state(model, param_dtype)
            f_args, f_kwargs = fake_inputs(args, kwargs, param_dtype)
        s.excluded = {storage_key(t) for t in state.values()}
        s.excludes_casts = autocast_dtype is not None
        handles = [
            module_mod.register_module_forward_pre_hook(pre_hook),
            module_mod.register_module_forward_hook(post_hook),
        ]
        for fqn in record_inputs:
            handles.append(model.get_submodule(fqn).register_forward_pre_hook(_input_recorder(s, fqn),
                                                                               with_kwargs=True))
        # a low-precision pass runs forward alone: no backward to tag autograd's nodes for
        forward_only = autocast_dtype is not None or param_dtype is not None
        autocast = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        tagger = nullcontext() if forward_only else _AutogradTagger(s)
        with fake_mode, _DispatchRecorder(s), tagger, autocast:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = torch.func.functional_call(model, state, f_args, f_kwargs, strict=False)
        for h in handles:
            h.remove()
        handles = []
        s.result.num_forward_ops = s.position
        leaves = [] if forward_only else [
            t for t in _output_leaves(out)
            if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()
        ]
        if leaves:
            s.in_backward = True
            with fake_mode, _DispatchRecorder(s):
                grads = [torch.ones_like(t) for t in leaves]
                torch.autograd.backward(leaves, grads)
    finally:
        for h in handles:
            h.remove()
    return s.result


def _input_recorder(s: _State, fqn: str):
    def hook(module, args, kwargs):
        if fqn not in s.result.inputs:
            s.result.inputs[fqn] = pytree.tree_map(describe_tensor, without_caches((args, kwargs)))

    return hook


def _output_leaves(out: Any) -> list:
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    elif isinstance(out, dict):
        out = list(out.values())
    return pytree.tree_leaves(out)
