"""The proof that a layer chain can be cut into pipeline stages (:mod:`autoplan.trace.skeleton` builds them).

One forward on fake tensors tags every tensor with the layers whose outputs it derives from. A layer's parameters
and buffers are tagged as *inside* it, and its outputs are re-tagged as its outputs when it returns. So the layers
each layer and the model output use, directly or through code between layers, are known exactly, and the carried
set of a cut is the non-replicated layers before it that anything after it uses.

A *free* layer is a module of the chain without parameters or buffers that runs more than once per forward (T5's
``encoder.dropout``, called after the embedding and again after the final norm). It is no layer for the cuts: each
of its calls between layers is a value of its own, made by the stage that holds the last layer returned before the
call and carried from there like a layer's output, so every later stage that reads it gets that stage's tensor (the
same dropout mask), not one of its own. A free module's calls inside another layer are that layer's computation.

A cut is refused when a later layer uses a value made inside an earlier layer other than through its output, when
a carried output holds a non-tensor, or when a layer with state (parameters, buffers) runs twice or two layers are
one module; parameters outside every layer refuse the split as a whole.

Example:
    >>> import torch
    >>> from autoplan.trace.cut_proof import analyse_cuts
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> cuts = analyse_cuts(model, ["0", "1", "2"], (torch.randn(3, 4),), {})
    >>> cuts.blocker is None, cuts.carried(2)
    (True, [1])
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from ..names import in_module
from .adapters import trace_kwargs
from .measure import FakeKernels, fake_inputs, fake_state

__all__ = ["CutAnalysis", "analyse_cuts", "agreed_analysis", "Value"]

_OUT = -1  # the model's output, as a consumer

#: a value that crosses cuts: a layer's index in the chain, or ``(i, n)`` for the n-th call of free layer i
Value = Union[int, tuple]


@dataclass
class CutAnalysis:
    """What one fake forward learned about the layer chain ``layers`` (see the module docstring)."""

    layers: list[str]
    replicated: set[int] = field(default_factory=set)  # parameter-free layers computed from model inputs only
    uses: dict[Any, set] = field(default_factory=dict)  # consumer (layer, free call or _OUT) -> values it uses
    bad_outputs: dict[Any, str] = field(default_factory=dict)  # value -> why it cannot be sent
    outputs: dict[Any, tuple] = field(default_factory=dict)  # value -> (treespec, which leaves are tensors)
    free: set[int] = field(default_factory=set)  # stateless layers run at several places (see the module docstring)
    after: dict[tuple, int] = field(default_factory=dict)  # free call -> the last layer returned before it (-1: none)
    blocker: str | None = None  # why the model cannot be split at all (None: every cut is sound)

    def position(self, value: Value) -> float:
        """Where ``value`` is made along the chain: a layer at its index, a free call just after the layer that
        returned before it (so it belongs to that layer's stage).

        Example:
            >>> CutAnalysis(["a", "b"], after={(1, 2): 0}).position((1, 2))
            0.5
        """
        return value if isinstance(value, int) else self.after[value] + 0.5

    def carried(self, cut: int) -> list[Value]:
        """Values made before ``cut`` that a stage starting at ``cut`` (or a later one) needs, in chain order.

        Example: see the module docstring.
        """
        consumers = [c for c in self.uses if c == _OUT or self.position(c) >= cut]
        used = set().union(*(self.uses[c] for c in consumers))
        return sorted((v for v in used if self.position(v) < cut and v not in self.replicated), key=self.position)


class _Tagger(TorchDispatchMode):
    """Tags every op's outputs with the union of its inputs' tags; records what each running layer consumes."""

    def __init__(self, tags: WeakIdKeyDictionary, state: dict):
        super().__init__()
        self.tags, self.state = tags, state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        found: set = set()
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                found |= self.tags.get(t, frozenset())
        if found:
            current = self.state["current"]
            if current is not None:
                self.state["consumed"].setdefault(current, set()).update(found)
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.tags[t] = frozenset(found | self.tags.get(t, frozenset()))
        return out


def _foreign(tag: tuple, consumer: Value) -> bool:
    """Whether a value tagged ``tag`` comes from outside ``consumer`` (a free call holds nothing inside)."""
    return consumer not in tag[1] if tag[0] == "in" else tag[1] != consumer


def _stateless(module: nn.Module) -> bool:
    return not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())


def _structural_blocker(model: nn.Module, layers: Sequence[str]) -> str | None:
    ids: dict[int, str] = {}
    for name in layers:
        module = model.get_submodule(name) if name else model
        if id(module) in ids:
            return f"layers {ids[id(module)]!r} and {name!r} are one module under two names"
        ids[id(module)] = name
    if "" in layers:
        return "the whole model is one layer"
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied weight: any of its names will do
        names.setdefault(id(p), []).append(name)
    outside = [ns[0] for ns in names.values()
               if not any(in_module(n.rpartition(".")[0], l) for n in ns for l in layers)]
    if outside:
        return (f"parameters {outside[:3]} belong to no layer of the chain (a stage holding them could not run the "
                f"code between layers that uses them)")
    return None


#: model -> {(layers, inputs, model signature): analysis}: tracing proves the cuts, applying the plan in the same
#: process reuses the proof; the key changes when the model does (a module swapped, a parameter replaced or
#: reshaped, a forward patched, a plain attribute or the config changed), and the entry dies with the model
_PROVEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def analyse_cuts(model: nn.Module, layers: Sequence[str], args: tuple, kwargs: dict) -> CutAnalysis:
    """Which values cross each cut of ``layers`` (the chain, in call order) and whether every cut is sound, from
    one forward of ``model(*args, **kwargs)`` on fake tensors (two when stateless layers run more than once: the
    second treats them as free). The model is not changed. The same model object, unchanged, asked again about
    the same layers and inputs gets the analysis already made.

    Example: see the module docstring.
    """
    key = _key(model, layers, args, kwargs)
    cached = _PROVEN.get(model, {}).get(key) if key is not None else None
    if cached is not None:
        return cached
    result = _analyse(model, layers, args, kwargs)
    if key is not None:
        _PROVEN.setdefault(model, {})[key] = result
    return result


def agreed_analysis(model: nn.Module, layers: Sequence[str], args: tuple, kwargs: dict) -> CutAnalysis:
    """:func:`analyse_cuts` run once, on rank 0, and sent to every rank when a process group is up (every rank
    holds the same model, checked against the plan), so that the ranks build their stages from one proof and refuse
    together; an error on rank 0 is raised on every rank. Without a process group: :func:`analyse_cuts`.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> agreed_analysis(model, ["0", "1", "2"], (torch.randn(3, 4),), {}).carried(1)
        [0]
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return analyse_cuts(model, layers, args, kwargs)
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = analyse_cuts(model, layers, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - sent on, so that no rank waits for a proof that never comes
            box[0] = (type(exc).__name__, str(exc))
    with warnings.catch_warnings():  # unpickling a treespec warns about its own deprecated LeafSpec check
        warnings.simplefilter("ignore", FutureWarning)
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], tuple):
        name, message = box[0]
        raise ValueError(f"the pipeline cut analysis failed on rank 0 ({name}: {message})")
    return box[0]


def _key(model: nn.Module, layers: Sequence[str], args: tuple, kwargs: dict) -> tuple | None:
    """What the analysis depends on, or None when an input cannot be told apart from another by value."""
    leaves, spec = pytree.tree_flatten((args, trace_kwargs(model, kwargs)))
    inputs = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            inputs.append((tuple(leaf.shape), leaf.dtype, leaf.device.type))
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            inputs.append((type(leaf), leaf))
        else:
            return None
    return tuple(layers), str(spec), tuple(inputs), _signature(model)


def _signature(model: nn.Module) -> tuple:
    parts: list = []
    for name, module in model.named_modules():
        plain = sorted((k, v) for k, v in vars(module).items()
                       if v is None or isinstance(v, (bool, int, float, str)))
        config = getattr(module, "config", None)
        parts.append((name, type(module), type(module).forward, vars(module).get("forward"), tuple(plain),
                      repr(config.to_dict()) if hasattr(config, "to_dict") else None))
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        parts.append((name, id(t), tuple(t.shape), t.dtype, t.device.type))
    return tuple(parts)


def _analyse(model: nn.Module, layers: Sequence[str], args: tuple, kwargs: dict) -> CutAnalysis:
    result = CutAnalysis(list(layers))
    result.blocker = _structural_blocker(model, layers)
    if result.blocker is not None:
        return result
    calls = _run(model, result, args, kwargs)
    twice = [i for i, n in calls.items() if n > 1]
    if twice and all(_stateless(model.get_submodule(layers[i])) for i in twice):
        result = CutAnalysis(list(layers), free=set(twice))  # calls of the free layers are values of their own
        calls = _run(model, result, args, kwargs)
    if result.blocker is not None:
        return result
    twice = [layers[i] for i, n in calls.items() if n > 1]
    never = [name for i, name in enumerate(layers) if i not in calls and i not in result.free]
    if twice or never:
        result.blocker = (f"layers {twice or never} run {'more than once' if twice else 'never'} in one forward, so "
                          f"a stage cannot stop after a given layer" +
                          (" (a layer may run at several places only without parameters or buffers)" if twice else ""))
        return result
    for cut in range(1, len(layers)):
        carried = result.carried(cut)
        bad = [f"{_describe(result, v)} ({result.bad_outputs[v]})" for v in carried if v in result.bad_outputs]
        if not carried or bad:
            result.blocker = (f"the cut before {layers[cut]!r} would carry " +
                              (", ".join(bad) if bad else "nothing (the stages after it do not use the ones before)"))
            return result
    return result


def _describe(result: CutAnalysis, value: Value) -> str:
    if isinstance(value, int):
        return repr(result.layers[value])
    return f"call {value[1]} of {result.layers[value[0]]!r}"


def _run(model: nn.Module, result: CutAnalysis, args: tuple, kwargs: dict) -> dict[int, int]:
    """One tagged fake forward filling ``result`` (``uses``, ``outputs``, ``replicated``, ``after`` or
    ``blocker``); returns how many times each non-free layer ran."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layers = result.layers
    index = {id(model.get_submodule(name)): i for i, name in enumerate(layers)}
    tags: WeakIdKeyDictionary = WeakIdKeyDictionary()
    state: dict[str, Any] = {"current": None, "consumed": {}, "calls": {}, "free_calls": {}, "last": -1,
                             "nested": []}
    has_params = {i: any(True for _ in model.get_submodule(n).parameters()) for i, n in enumerate(layers)}

    def record(value: Value, output) -> None:
        leaves, spec = pytree.tree_flatten(output)
        result.outputs[value] = (spec, tuple(isinstance(leaf, torch.Tensor) for leaf in leaves))
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                tags[leaf] = frozenset({("out", value)})
            elif leaf is not None:
                result.bad_outputs[value] = f"its output holds a {type(leaf).__name__}, not only tensors"

    def pre(module, _args):
        i = index[id(module)]
        if i in result.free:
            # a call inside a running layer is part of that layer; between layers it is a value of its own
            state["nested"].append(state["current"] is not None)
            if state["current"] is None:
                n = state["free_calls"][i] = state["free_calls"].get(i, 0) + 1
                result.after[(i, n)] = state["last"]
                state["current"] = (i, n)
            return
        state["calls"][i] = state["calls"].get(i, 0) + 1
        state["current"] = i

    def post(module, _args, output):
        i = index[id(module)]
        if i in result.free:
            if not state["nested"].pop():
                value, state["current"] = state["current"], None
                state["consumed"].setdefault(value, set())
                record(value, output)
            return
        state["current"], state["last"] = None, i
        consumed = state["consumed"].get(i, set())
        if not has_params[i] and not any(_foreign(tag, i) for tag in consumed):  # its own buffers are constants
            result.replicated.add(i)
            for leaf in pytree.tree_leaves(output):  # made from constants: the same on every stage
                if isinstance(leaf, torch.Tensor):
                    tags[leaf] = frozenset()
            return
        record(i, output)

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    handles = []
    try:
        with fake_mode:
            fake = fake_state(model)
            f_args, f_kwargs = fake_inputs(args, trace_kwargs(model, kwargs))
        owners: dict[int, set[int]] = {}
        for name, t in fake.items():  # a tied weight is inside every layer that holds it
            owners.setdefault(id(t), set()).update(
                i for i, l in enumerate(layers) if in_module(name.rpartition(".")[0], l))
        for t in fake.values():
            if owners[id(t)]:
                tags[t] = frozenset({("in", frozenset(owners[id(t)]))})
        for name in layers:
            module = model.get_submodule(name)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        with fake_mode, FakeKernels(), _Tagger(tags, state), torch.no_grad():
            out = torch.func.functional_call(model, fake, f_args, f_kwargs, strict=False)
    except Exception as exc:  # noqa: BLE001 - the reason is reported as the blocker
        result.blocker = f"its forward did not run on fake tensors for the split analysis ({type(exc).__name__}: {exc})"
        return state["calls"]
    finally:
        for h in handles:
            h.remove()
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    out_tags: set = set()
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            out_tags |= tags.get(leaf, frozenset())
    state["consumed"][_OUT] = out_tags
    for consumer, found in state["consumed"].items():
        inside = sorted({layers[min(t[1])] for t in found if t[0] == "in" and _foreign(t, consumer)})
        if inside:
            where = ("the model's output" if consumer == _OUT else
                     f"layer {layers[consumer]!r}" if isinstance(consumer, int) else _describe(result, consumer))
            result.blocker = (f"{where} uses values made inside {inside} other than through their outputs, which "
                              f"a stage boundary cannot carry")
            return state["calls"]
        result.uses[consumer] = {t[1] for t in found if t[0] == "out"}
    return state["calls"]
