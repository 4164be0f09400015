"""Prove each tensor-parallel group sound before it is offered: shard it numerically, compare with unsharded.

A group found in the op graph (:mod:`autoplan.trace.tp_groups`) is a guess from dataflow: it says nothing about
how the module's own code treats the sharded features. A fused ``qkv`` read by ``.split(n_embd)``, a fused
``gate_up`` read by ``.chunk(2)``, a ``view(B, T, num_heads, head_dim)`` with the global head count or a key/value
projection the detection missed all make a Megatron split wrong, by a crash or, worse, by wrong numbers. So each
candidate is checked once per structure (blocks, or traces, whose check would read the same code, attributes, shapes and
inputs share one verdict: :mod:`autoplan.trace.tp_check_key`) on small real tensors:

1. the group's parent module (the innermost module holding all of its linears) gets fresh random weights (the
   model's own may be on the meta device), and its inputs are those of the example batch, recorded on fake
   tensors and filled with random values (integer inputs as zeros, masks as all-true), the batch cut to one sample;
2. the reference: the parent's forward, keeping the rowwise linear's output;
3. the shard, exactly as ``ColwiseParallel``/``RowwiseParallel`` lay it out for degree ``t`` (the smallest prime
   of the group's divisor): for each rank ``r``, the colwise linears keep output rows ``r``-th of ``t`` (and their
   bias; a fused ``colwise:K`` or ``colwise:a+b+c`` linear the ``r``-th of ``t`` of each of its parts; a ``Conv1D``
   the columns of its ``(in, out)`` weight, with its ``nf`` set to the local width), the rowwise linear input
   columns ``r``-th of ``t`` and its bias on one rank only; the parent's forward runs with these slices and the rowwise partial outputs are summed (the all-reduce);
   an attention module that counts its heads in attributes (``num_heads``, ``embed_dim``…) sees them divided by
   ``t`` meanwhile, as the executor sets them (torchtitan's ``n_heads // tp``);
4. parameters left whole on every rank but used between the linears (a norm on the sharded heads) must get the
   full gradient on each rank, since nothing sums them over the tp ranks: each rank's gradient is compared with
   the unsharded one;
5. the group is kept when the sum equals the reference (relative error under :data:`TOLERANCE`); otherwise its
   DTensor form (global-shape DTensors between the linears, :mod:`autoplan.trace.tp_check_global`) is checked and
   kept when sound, or the group is dropped and the reasons (the error raised, or the size of the difference) kept. A parent of more than
   :data:`NUMERIC_CHECK_MAX_PARAMS` parameters runs on the meta device instead, which checks shapes only.

Vocabulary groups (embedding rows, LM head columns) are not checked: their sharded result is all-reduced or
gathered inside the module itself, so they cannot meet the module's code in a sharded form.

Example:
    >>> import torch
    >>> from autoplan.models import GPT, GPTConfig
    >>> from autoplan.trace.opgraph import build_op_graph
    >>> from autoplan.trace.tp_groups import detect_tp_groups
    >>> model, idx = GPT(GPTConfig()), torch.randint(0, 256, (2, 16))
    >>> groups = detect_tp_groups(build_op_graph(model, (idx,), {}), model)
    >>> kept, dropped = check_tp_groups(model, groups, (idx,), {})
    >>> len(kept), dropped
    (6, [])
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .measure import TensorSpec
from ..vocabulary import fused_sizes, part_sizes, tp_style_kind
from .opgraph import is_conv1d
from .tp_check_global import INSIDE_A_WORLD, KEPT_AS_DTENSOR, as_dtensor_styles, or_global_verdict as _or_global
from .tp_check_key import VERDICTS, verdict_key
from .tp_groups import DetectedGroup
from .tp_heads import divide_head_attributes, local_head_owners

__all__ = ["DroppedGroup", "check_tp_groups", "record_parents", "TOLERANCE"]

#: a parent module with more parameters is checked on the meta device (shapes, not numbers): its real-valued
#: check would take seconds and gigabytes (a 175B model's MLP holds 1.2 billion parameters)
NUMERIC_CHECK_MAX_PARAMS = 2**27
_PERIOD = 65521  # largest prime below 2**16

#: largest relative difference (max |sharded − unsharded| / max |unsharded|) of a sound group in fp32
TOLERANCE = 1e-4


@dataclass(frozen=True)
class DroppedGroup:
    """A candidate tensor-parallel group that sharding would break, and why."""

    styles: dict[str, str]
    reason: str


def _parent_of(fqns) -> str:
    parts = [f.split(".") for f in fqns]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    # the common prefix of a single module's FQN is the module itself: its parent runs the group
    if len(common) == min(len(p) for p in parts):
        common = common[:-1]
    return ".".join(common)


def _smallest_prime(n: int) -> int:
    for p in range(2, int(n ** 0.5) + 1):
        if n % p == 0:
            return p
    return n


def record_parents(model: nn.Module, groups: list[DetectedGroup]) -> set[str]:
    """The modules whose inputs :func:`check_tp_groups` needs: the parent of every candidate pair (what it is
    called with is part of what decides its verdict)."""
    return {_parent_of(list(g.styles)) for g in groups if "rowwise" in g.styles.values()}


def _record_inputs(model: nn.Module, parents: set[str], args: tuple, kwargs: dict) -> dict[str, tuple]:
    """Shapes, dtypes and non-tensor values of each parent's first call, from one forward on fake tensors."""
    from .measure import measure

    return measure(model, args, kwargs, record_inputs=parents).inputs


def _materialize(spec, generator: torch.Generator, batch: int | None, device: str = "cpu"):
    if not isinstance(spec, TensorSpec):
        return spec
    shape = spec.shape
    if batch is not None and shape and shape[0] == batch:
        shape = (1,) + shape[1:]  # one sample is enough to see whether the shard math holds
    if spec.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not spec.dtype.is_floating_point:
        return torch.zeros(shape, dtype=spec.dtype, device=device)
    if device == "meta":
        return torch.empty(shape, device="meta")
    return _random(shape, generator)


def _random(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """Random values, fast at any size: a random block of a prime length tiled (no row or column repeats)."""
    numel = 1
    for d in shape:
        numel *= d
    period = min(numel, _PERIOD)
    block = torch.randn(period, generator=generator)
    return block.repeat(-(-numel // period))[:numel].view(shape)


def _random_state(module: nn.Module, generator: torch.Generator, device: str = "cpu") -> dict[str, torch.Tensor]:
    if device == "meta":  # shapes only
        return {n: torch.empty(tuple(t.shape), dtype=torch.float32 if t.is_floating_point() else t.dtype,
                               device="meta")
                for n, t in [*module.named_parameters(), *module.named_buffers()]}
    state = {}
    for name, p in module.named_parameters():  # each tensor once: tied weights stay tied
        if p.dim() >= 2:  # weights scaled like a default init, so activations stay O(1)
            state[name] = _random(tuple(p.shape), generator) * p.shape[-1] ** -0.5
        elif name.endswith("weight"):  # a norm's scale
            state[name] = 1 + 0.1 * _random(tuple(p.shape), generator)
        else:
            state[name] = 0.1 * _random(tuple(p.shape), generator)
    for name, b in module.named_buffers():
        if b.device.type != "meta":
            state[name] = b.float() if b.is_floating_point() else b
        elif b.is_floating_point():
            state[name] = torch.randn(tuple(b.shape), generator=generator)
        else:
            state[name] = torch.zeros(tuple(b.shape), dtype=b.dtype)
    return state


def _colwise_share(tensor: torch.Tensor, dim: int, sizes: tuple[int, ...], rank: int, t: int) -> torch.Tensor:
    """Rank ``rank``'s output features: the r-th of t of each part of ``sizes`` ([q_r; k_r; v_r] of a fused qkv), as
    DTensor's ``_StridedShard(dim, split_factor=K)`` lays out K equal parts (``Shard(dim)`` for one) and
    :class:`~autoplan.execute.tp_styles.FusedRowsColwise` hands unequal ones to the matmul."""
    return torch.cat([part.chunk(t, dim=dim)[rank] for part in tensor.split(list(sizes), dim=dim)], dim=dim)


def _shard_state(state: dict, parent: str, styles: dict[str, str], rank: int, t: int,
                 transposed: frozenset = frozenset(), cut=_colwise_share) -> dict:
    """``state`` with each styled linear cut to rank ``rank``'s share, as ColwiseParallel/RowwiseParallel do;
    ``transposed``: the FQNs whose weight is stored ``(in, out)`` (GPT-2's ``Conv1D``), cut on the other dim;
    ``cut(tensor, dim, part sizes, rank, t)``: how a share is taken (by default, sliced out)."""
    out = dict(state)
    prefix = parent + "." if parent else ""
    for fqn, style in styles.items():
        rel = fqn[len(prefix):]
        weight, bias = out[f"{rel}.weight"], out.get(f"{rel}.bias")
        out_dim, in_dim = (1, 0) if fqn in transposed else (0, 1)
        if tp_style_kind(style) == "colwise":
            sizes = part_sizes(style, weight.shape[out_dim])
            out[f"{rel}.weight"] = cut(weight, out_dim, sizes, rank, t)
            if bias is not None:
                out[f"{rel}.bias"] = cut(bias, 0, sizes, rank, t)
        else:  # rowwise: input features sharded, the bias added once after the all-reduce
            out[f"{rel}.weight"] = cut(weight, in_dim, (weight.shape[in_dim],), rank, t)
            if bias is not None and rank > 0:
                out[f"{rel}.bias"] = torch.zeros_like(bias)
    return out


def _rowwise_output(parent_module: nn.Module, row_module: nn.Module, state: dict, args, kwargs,
                    grad: bool = False) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = row_module.register_forward_hook(lambda m, i, o: seen.append(o) if not seen else None)
    modes = {m: m.training for m in parent_module.modules()}
    parent_module.eval()  # dropout would make the two runs differ by chance, not by the shard
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            torch.func.functional_call(parent_module, state, args, kwargs, strict=False)
    finally:
        handle.remove()
        for m, training in modes.items():
            m.training = training
    if not seen:
        raise RuntimeError("the rowwise linear did not run in its parent's forward")
    return seen[0]


def _replica_gradient_error(parent_module: nn.Module, row_module: nn.Module, state: dict, parent: str,
                            styles: dict[str, str], t: int, args, kwargs, probe: torch.Tensor,
                            transposed: frozenset = frozenset(), share=None) -> str | None:
    """Parameters the shard leaves whole on every rank (a norm between the colwise and rowwise linears) must get
    the full gradient on each rank, since nothing sums them over the tp ranks: compare each rank's gradient (the
    all-reduce hands every rank the full output gradient, ``probe``) with the unsharded one."""
    prefix = parent + "." if parent else ""
    sharded = {fqn[len(prefix):] for fqn in styles}
    replicated = [n for n, _ in parent_module.named_parameters() if n.rpartition(".")[0] not in sharded
                  and state[n].is_floating_point()]
    if not replicated:
        return None

    def detach_inputs(module, inputs):
        return tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in inputs)

    def gradients(st: dict) -> list[torch.Tensor]:
        leaves = {n: st[n].detach().clone().requires_grad_(True) for n in replicated}
        # what runs before the colwise linears gets its full gradient from ColwiseParallel's input all-reduce:
        # cut it off, so that only parameters between the linears are compared
        hooks = [parent_module.get_submodule(fqn[len(prefix):]).register_forward_pre_hook(detach_inputs)
                 for fqn, style in styles.items() if tp_style_kind(style) == "colwise"]
        try:
            out = _rowwise_output(parent_module, row_module, {**st, **leaves}, args, kwargs, grad=True)
        finally:
            for h in hooks:
                h.remove()
        if not out.requires_grad:
            return [torch.zeros_like(leaves[n]) for n in replicated]
        found = torch.autograd.grad((out * probe).sum(), [leaves[n] for n in replicated], allow_unused=True)
        return [torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(replicated, found)]

    reference = gradients(state)
    for rank in range(t):
        got = gradients((share or _shard_state)(state, parent, styles, rank, t, transposed))
        for name, ref, g in zip(replicated, reference, got):
            error = _relative_error(g, ref)
            if not error <= TOLERANCE:
                return (f"{prefix}{name} is used between the sharded linears but stays whole on every rank: its "
                        f"gradient on a {t}-way shard differs from the unsharded one (relative {error:.1e}) and "
                        f"nothing sums it over the tp ranks")
    return None


@contextmanager
def _local_heads(model: nn.Module, styles: dict[str, str], t: int):
    """The colwise modules' owners count heads/features per shard (as the executor sets them) inside the block."""
    colwise = [f for f, s in styles.items() if tp_style_kind(s) == "colwise"]
    undo = divide_head_attributes(local_head_owners(model, colwise), t)
    for fqn in colwise:  # a Conv1D reshapes its output to its own nf: on the shard, its local columns (the
        conv = model.get_submodule(fqn)  # executor's DTensor keeps the global nf and the same local values)
        if is_conv1d(conv):
            undo.append((conv, "nf", conv.nf))
            conv.nf //= t
    try:
        yield
    finally:
        for owner, name, value in undo:
            setattr(owner, name, value)


def _relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude (1 when the reference is all zeros)."""
    return (got - reference).abs().max().item() / (reference.abs().max().item() or 1.0)


def _check_one(model: nn.Module, group: DetectedGroup, parent: str, recorded: tuple, batch: int) -> str | None:
    """None when the group shards soundly at degree t, else the reason it does not."""
    if group.divisor < 2:
        unequal = next((s for s in group.styles.values() if fused_sizes(s)), None)
        if unequal is not None:  # grouped key/value heads: a rank must hold whole ones, with their query heads
            return (f"no degree above 1 divides the heads of every part of its fused projection ({unequal}): each "
                    f"rank must hold whole key/value heads with their query heads, so the tp degree must divide the "
                    f"key/value heads")
        return "no degree above 1 divides its heads/features"
    parent_module = model.get_submodule(parent) if parent else model
    numeric = sum(p.numel() for p in parent_module.parameters()) <= NUMERIC_CHECK_MAX_PARAMS
    device = "cpu" if numeric else "meta"
    # The model may be traced under an ambient `with torch.device("meta")`: tensors its forward creates without a
    # device must land where the check's weights are.
    with torch.device(device):
        return _check_on(model, group, parent, parent_module, recorded, batch, numeric, device)


def _check_on(model: nn.Module, group: DetectedGroup, parent: str, parent_module: nn.Module, recorded: tuple,
              batch: int, numeric: bool, device: str) -> str | None:
    styles = group.styles
    transposed = frozenset(fqn for fqn in styles if is_conv1d(model.get_submodule(fqn)))
    t = _smallest_prime(group.divisor)
    row_fqn = next(f for f, s in styles.items() if s == "rowwise")
    row_module = model.get_submodule(row_fqn)
    generator = torch.Generator().manual_seed(0)
    state = _random_state(parent_module, generator, device)
    args, kwargs = pytree.tree_map(lambda s: _materialize(s, generator, batch, device), recorded)
    try:
        reference = _rowwise_output(parent_module, row_module, state, args, kwargs)
    except Exception:  # noqa: BLE001 - one sample may not suit the module: retry with the whole example batch
        args, kwargs = pytree.tree_map(lambda s: _materialize(s, generator, None, device), recorded)
        try:
            reference = _rowwise_output(parent_module, row_module, state, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - what cannot be checked is not offered
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return f"{parent or 'the model'} could not be run alone to check the shard ({first[:160]})"
    try:
        with _local_heads(model, styles, t):
            total = None
            for rank in range(t):
                part = _rowwise_output(parent_module, row_module,
                                       _shard_state(state, parent, styles, rank, t, transposed), args, kwargs)
                total = part if total is None else total + part
    except Exception as exc:  # noqa: BLE001 - any failure of the sharded forward means the group is unsound
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        local = f"{parent or 'the model'}'s forward fails on a {t}-way shard ({type(exc).__name__}: {first[:160]})"
        return _or_global(local, model, group, parent, parent_module, state, args, kwargs, reference, t, numeric,
                          transposed, generator)
    if total.shape != reference.shape:
        return f"a {t}-way shard gives output shape {tuple(total.shape)} instead of {tuple(reference.shape)}"
    if not numeric:
        return None
    error = _relative_error(total, reference)
    if not error <= TOLERANCE:
        local = (f"a {t}-way shard computes other numbers (relative difference {error:.1e}): {parent or 'the model'}'s "
                 f"code reads the sharded features by their global layout (a fused projection cut by position, "
                 f"or a projection the group misses)")
        return _or_global(local, model, group, parent, parent_module, state, args, kwargs, reference, t, numeric,
                          transposed, generator)
    with _local_heads(model, styles, t):
        return _replica_gradient_error(parent_module, row_module, state, parent, styles, t, args, kwargs,
                                       _random(tuple(reference.shape), generator), transposed)


def _checker() -> tuple:
    """This module's functions and constants: a verdict is reused only by the check that gave it."""
    return tuple((k, v) for k, v in sorted(globals().items())
                 if not k.startswith("__") and isinstance(v, (types.FunctionType, int, float)))


def check_tp_groups(model: nn.Module, groups: list[DetectedGroup], args: tuple, kwargs: dict,
                    recorded: dict[str, tuple] | None = None) -> tuple[list[DetectedGroup], list[DroppedGroup]]:
    """``(sound groups, dropped groups with reasons)``; see the module docstring for the method. ``recorded``: the
    inputs of the :func:`record_parents` modules from a measurement already made (else one is made here)."""
    pairs = [g for g in groups if "rowwise" in g.styles.values()]
    if not pairs:
        return list(groups), []
    parents = {id(g): _parent_of(list(g.styles)) for g in pairs}
    batch = next((t.shape[0] for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), None)
    if recorded is None:
        recorded = _record_inputs(model, set(parents.values()), args, kwargs)
    verdicts: dict[int, str | None] = {}
    here: dict[tuple, str | None] = {}  # this model's verdicts, word for word (its blocks share one reason)
    for g in pairs:
        parent = parents[id(g)]
        module = model.get_submodule(parent) if parent else model
        key = verdict_key(module, parent, g.styles, g.divisor, recorded.get(parent), batch,
                          _checker())
        found = (here[key],) if key in here else VERDICTS.get(key, parent)
        if found is not None:  # proven before: a repeated block, or the same structure traced again
            verdicts[id(g)] = found[0]
        elif parent not in recorded:
            verdicts[id(g)] = f"{parent or 'the model'} is never called by forward as a module"
        else:
            verdicts[id(g)] = _check_one(model, g, parent, recorded[parent], batch)
            if not (verdicts[id(g)] or "").endswith(INSIDE_A_WORLD):
                VERDICTS.put(key, parent, verdicts[id(g)])
        if key is not None:
            here[key] = verdicts[id(g)]
    kept, dropped = [], []
    for g in groups:
        verdict = verdicts.get(id(g))  # a group without a rowwise end is not checked
        if verdict is None:
            kept.append(g)
        elif verdict == KEPT_AS_DTENSOR:
            kept.append(replace(g, styles=as_dtensor_styles(g.styles)))
        else:
            dropped.append(DroppedGroup(dict(g.styles), verdict))
    return kept, dropped
