"""Pipeline stages that keep the original modules for models ``torch.fx`` cannot trace (transformers 5).

A stage is a *skeleton* of the model: a shallow copy of the root and of every module on the path to a layer, in
which each layer of the chain is either the original module or a parameter-free stand-in. The stage runs the
model's own ``forward`` on the microbatch's model inputs (every stage gets them), so the code between layers
(position ids, masks, scaling) runs as written and the stage's layers stay real ``nn.Module`` objects under their
original FQNs — tensor parallelism, recompute, FSDP and state dicts address them by name. For stage ``[c, d)``:

- layers ``c .. d-1`` are the originals;
- a layer before ``c`` whose output a later layer (or the model's output) uses is *carried*: the previous stage
  sends its output tensors and the stand-in returns them (a gradient flows back to that stage);
- a parameter-free layer computed from model inputs only (rotary cos/sin tables) is *replicated*: it runs on
  every stage;
- any other layer before ``c`` returns NaN (integers: zeros) of the shape and dtype the layer would return (run
  once per input signature on fake tensors): its value is never used, only its shape;
- the first layer at or after ``d`` stops the forward; the stage returns the tensors carried across ``d``.

Soundness is proven before any stage exists, by :func:`analyse_cuts`: one forward on fake tensors tags every
tensor with the layers whose outputs it derives from. A layer's parameters and buffers are tagged as *inside* it,
and its outputs are re-tagged as its outputs when it returns. So the layers each layer and the model output use,
directly or through code between layers, are known exactly, and the carried set of a cut is the non-replicated
layers before it that anything after it uses. A cut is refused when a later layer uses a value made inside an
earlier layer other than through its output, when a carried output holds a non-tensor, or when a layer runs twice
or has two names; parameters outside every layer refuse the split as a whole.

Example:
    >>> import torch
    >>> from autoplan.trace.skeleton import analyse_cuts
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> cuts = analyse_cuts(model, ["0", "1", "2"], (torch.randn(3, 4),), {})
    >>> cuts.blocker is None, cuts.carried(2)
    (True, [1])
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from ..names import in_module
from .adapters import trace_kwargs
from .measure import FakeKernels, describe_tensor, fake_inputs, fake_state

__all__ = ["CutAnalysis", "analyse_cuts", "skeleton_stages", "stands_in"]

_OUT = -1  # the model's output, as a consumer


@dataclass
class CutAnalysis:
    """What one fake forward learned about the layer chain ``layers`` (see the module docstring)."""

    layers: list[str]
    replicated: set[int] = field(default_factory=set)  # parameter-free layers computed from model inputs only
    uses: dict[int, set[int]] = field(default_factory=dict)  # consumer (layer index or _OUT) -> layers it uses
    bad_outputs: dict[int, str] = field(default_factory=dict)  # layer -> why its output cannot be sent
    outputs: dict[int, tuple] = field(default_factory=dict)  # layer -> (treespec, which leaves are tensors)
    blocker: str | None = None  # why the model cannot be split at all (None: every cut is sound)

    def carried(self, cut: int) -> list[int]:
        """Layers before ``cut`` whose outputs a stage starting at ``cut`` (or a later one) needs.

        Example: see the module docstring.
        """
        consumers = [*range(cut, len(self.layers)), _OUT]
        used = set().union(*(self.uses.get(j, set()) for j in consumers))
        return sorted(i for i in used if i < cut and i not in self.replicated)


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


def _foreign(tag: tuple, consumer: int) -> bool:
    """Whether a value tagged ``tag`` comes from outside layer ``consumer``."""
    return consumer not in tag[1] if tag[0] == "in" else tag[1] != consumer


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


def analyse_cuts(model: nn.Module, layers: Sequence[str], args: tuple, kwargs: dict) -> CutAnalysis:
    """Which layer outputs cross each cut of ``layers`` (the chain, in call order) and whether every cut is sound,
    from one forward of ``model(*args, **kwargs)`` on fake tensors. The model is not changed.

    Example: see the module docstring.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    result = CutAnalysis(list(layers))
    result.blocker = _structural_blocker(model, layers)
    if result.blocker is not None:
        return result
    index = {id(model.get_submodule(name)): i for i, name in enumerate(layers)}
    tags: WeakIdKeyDictionary = WeakIdKeyDictionary()
    state: dict[str, Any] = {"current": None, "consumed": {}, "calls": {}}
    has_params = {i: any(True for _ in model.get_submodule(n).parameters()) for i, n in enumerate(layers)}

    def pre(module, _args):
        i = index[id(module)]
        state["calls"][i] = state["calls"].get(i, 0) + 1
        state["current"] = i

    def post(module, _args, output):
        i = index[id(module)]
        state["current"] = None
        consumed = state["consumed"].get(i, set())
        if not has_params[i] and not any(_foreign(tag, i) for tag in consumed):  # its own buffers are constants
            result.replicated.add(i)
            for leaf in pytree.tree_leaves(output):  # made from constants: the same on every stage
                if isinstance(leaf, torch.Tensor):
                    tags[leaf] = frozenset()
            return
        leaves, spec = pytree.tree_flatten(output)
        result.outputs[i] = (spec, tuple(isinstance(leaf, torch.Tensor) for leaf in leaves))
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                tags[leaf] = frozenset({("out", i)})
            elif leaf is not None:
                result.bad_outputs[i] = f"its output holds a {type(leaf).__name__}, not only tensors"

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
        for i, name in enumerate(layers):
            module = model.get_submodule(name)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        with fake_mode, FakeKernels(), _Tagger(tags, state), torch.no_grad():
            out = torch.func.functional_call(model, fake, f_args, f_kwargs, strict=False)
    except Exception as exc:  # noqa: BLE001 - the reason is reported as the blocker
        result.blocker = f"its forward did not run on fake tensors for the split analysis ({type(exc).__name__}: {exc})"
        return result
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
    twice = [layers[i] for i, n in state["calls"].items() if n > 1]
    never = [name for i, name in enumerate(layers) if i not in state["calls"]]
    if twice or never:
        result.blocker = (f"layers {twice or never} run {'more than once' if twice else 'never'} in one forward, so "
                          f"a stage cannot stop after a given layer")
        return result
    for consumer, found in state["consumed"].items():
        inside = sorted({layers[min(t[1])] for t in found if t[0] == "in" and _foreign(t, consumer)})
        if inside:
            where = "the model's output" if consumer == _OUT else f"layer {layers[consumer]!r}"
            result.blocker = (f"{where} uses values made inside {inside} other than through their outputs, which "
                              f"a stage boundary cannot carry")
            return result
        result.uses[consumer] = {t[1] for t in found if t[0] == "out"}
    for cut in range(1, len(layers)):
        carried = result.carried(cut)
        bad = [f"{layers[i]!r} ({result.bad_outputs[i]})" for i in carried if i in result.bad_outputs]
        if not carried or bad:
            result.blocker = (f"the cut before {layers[cut]!r} would carry " +
                              (", ".join(bad) if bad else "nothing (the stages after it do not use the ones before)"))
            return result
    return result


# ------------------------------------------------------------------------------------------------ stage modules


class _StageExit(Exception):
    """Raised by the first layer after a stage to leave the model's forward early (caught by the stage)."""


class _Run:
    """One stage forward's state, shared by the stage and its stand-ins."""

    def __init__(self):
        self.received: dict[int, Any] = {}
        self.stash: dict[int, Any] = {}
        self.device: torch.device | None = None


class _Output:
    """The last stage's output as torch pipelining takes it (a tensor or a tuple of tensors) and back: a mapping (a
    transformers ``ModelOutput``) leaves as the tuple of its non-None values, and :meth:`rebuild` makes the mapping
    again for the loss function."""

    def __init__(self):
        self.kind: type | None = None
        self.keys: list = []

    def flatten(self, output: Any) -> Any:
        if not hasattr(output, "items"):
            return output
        self.kind, self.keys = type(output), [k for k, v in output.items() if v is not None]
        return tuple(output[k] for k in self.keys)

    def rebuild(self, output: Any) -> Any:
        if self.kind is None:
            return output
        if isinstance(output, torch.Tensor):  # torch pipelining hands a 1-tuple over as its tensor
            output = (output,)
        return self.kind(**dict(zip(self.keys, output)))


def _meta_copy(module: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


class _Stand(nn.Module):
    """A parameter-free stand-in for a layer this stage does not run."""

    def __init__(self, name: str, role: str, run: _Run, index: int, shape_module: nn.Module):
        super().__init__()
        # underscored: the layer's own attributes (read through __getattr__) keep their plain names
        self._fqn, self._role, self._index = name, role, index
        object.__setattr__(self, "_run", run)
        object.__setattr__(self, "_shape_module", shape_module)  # a meta copy, not a registered child
        object.__setattr__(self, "_shapes", {})

    def extra_repr(self) -> str:
        return f"{self._fqn!r}, {self._role}"

    def __getattr__(self, name: str):
        # code between layers may read a layer's attributes (a weight's dtype, a config value): the meta copy's,
        # whose shapes, dtypes and Python values are the original's and whose tensor values cannot be read
        try:
            return super().__getattr__(name)
        except AttributeError:
            shape_module = self.__dict__.get("_shape_module")
            if shape_module is None:
                raise
            return getattr(shape_module, name)

    def forward(self, *args, **kwargs):
        if self._role == "exit":
            raise _StageExit
        if self._role == "carried":
            return self._run.received[self._index]
        return self._placeholder(args, kwargs)

    def _placeholder(self, args, kwargs):
        from torch._subclasses.fake_tensor import FakeTensorMode

        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        key = tuple((tuple(t.shape), t.dtype) for t in leaves)
        if key not in self._shapes:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                state = fake_state(self._shape_module)
                f_args, f_kwargs = fake_inputs(args, kwargs)
            with mode, FakeKernels(), torch.no_grad():
                out = torch.func.functional_call(self._shape_module, state, f_args, f_kwargs, strict=False)
            self._shapes[key] = pytree.tree_map(describe_tensor, out)
        device = self._run.device

        def make(spec):
            if not hasattr(spec, "shape") or not isinstance(spec.dtype, torch.dtype):
                return spec
            fill = float("nan") if spec.dtype.is_floating_point else 0
            return torch.full(spec.shape, fill, dtype=spec.dtype, device=device)

        return pytree.tree_map(make, self._shapes[key])


def stands_in(module: nn.Module) -> bool:
    """Whether ``module`` is a skeleton stage's stand-in for a layer the stage does not hold.

    Example:
        >>> stands_in(torch.nn.Linear(2, 2))
        False
    """
    return isinstance(module, _Stand)


def _skeleton(module: nn.Module, prefix: str, replace: dict[str, nn.Module]) -> nn.Module:
    """A shallow copy of ``module`` with the modules named in ``replace`` swapped (the root is always copied)."""
    if prefix in replace:
        return replace[prefix]
    if prefix and not any(in_module(name, prefix) and name != prefix for name in replace):
        return module  # nothing below changes: the original object
    new = copy.copy(module)
    for attr in ("_modules", "_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks",
                 "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
                 "_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_non_persistent_buffers_set"):
        if attr in module.__dict__:
            value = module.__dict__[attr]
            new.__dict__[attr] = copy.copy(value)
    for name, child in module._modules.items():
        if child is not None:
            new._modules[name] = _skeleton(child, f"{prefix}.{name}" if prefix else name, replace)
    return new


def skeleton_stages(model: nn.Module, stages: Sequence[Sequence[str]], analysis: CutAnalysis) -> list[nn.Module]:
    """One skeleton module per stage (see the module docstring). Each takes the tensors the previous stage returns
    as positional inputs and the microbatch's model inputs as ``model_inputs=(args, kwargs)``; it returns the
    tensors carried to the next stage, or (the last) the model's output.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> x = torch.randn(3, 4)
        >>> cuts = analyse_cuts(model, ["0", "1", "2"], (x,), {})
        >>> first, second = skeleton_stages(model, [["0", "1"], ["2"]], cuts)
        >>> inputs = ((x,), {})
        >>> torch.equal(second(*first(model_inputs=inputs), model_inputs=inputs), model(x))
        True
    """
    if analysis.blocker is not None:
        raise ValueError(f"{type(model).__name__} cannot be split into pipeline stages: {analysis.blocker}")
    names = analysis.layers
    position = {name: i for i, name in enumerate(names)}
    listed = [position[n] for stage in stages for n in stage]
    if listed != list(range(len(names))):
        raise ValueError(f"the stages {[list(s) for s in stages]} do not list the layer chain {names} once each, "
                         f"in order")
    starts = [position[stage[0]] for stage in stages] + [len(names)]
    modules = []
    for k in range(len(stages)):
        c, d = starts[k], starts[k + 1]
        carried_in = analysis.carried(c) if k else []
        carried_out = analysis.carried(d) if k < len(stages) - 1 else None
        run = _Run()
        replace: dict[str, nn.Module] = {}
        for i, name in enumerate(names):
            if c <= i < d or (i < c and i in analysis.replicated):
                continue
            role = "exit" if i >= d else "carried" if i in carried_in else "placeholder"
            replace[name] = _Stand(name, role, run, i, _meta_copy(model.get_submodule(name)))
        held = {id(p) for layer in names[c:d] for p in model.get_submodule(layer).parameters()}
        for name in _weights_outside_layers(model, names):  # e.g. BART's model.shared, tied to layers' weights
            if not held & {id(p) for p in model.get_submodule(name).parameters()}:
                replace[name] = _Stand(name, "placeholder", run, -1, _meta_copy(model.get_submodule(name)))
        root = _skeleton(model, "", replace)
        _make_stage(root, model, run, names, (c, d), (carried_in, carried_out), analysis.outputs)
        modules.append(root)
    return modules


def _weights_outside_layers(model: nn.Module, layers: list[str]) -> list[str]:
    """Top-most modules outside every layer (and above none) that hold weights: every weight is a layer's too (tied,
    else the split is refused) and, by the analysis, never used outside it; a stage keeps one only where its layers
    hold the same weights, so that a stage holds a weight only where one of its layers does (and every name of a
    tied weight stays in some stage's state dict)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or any(in_module(name, f) for f in found) or any(in_module(name, l) for l in layers):
            continue
        if any(in_module(l, name) for l in layers):
            continue  # a container on the path to layers: copied by the skeleton
        if any(True for _ in module.parameters()):
            found.append(name)
    return found


def _make_stage(root: nn.Module, model: nn.Module, run: _Run, names: list[str], span: tuple[int, int],
                carried: tuple[list[int], list[int] | None], outputs: dict[int, tuple]) -> None:
    forward = type(model).forward
    (c, d), (carried_in, carried_out) = span, carried
    hooks: list = []
    shape = _Output()

    def stash_hook(i):
        def hook(module, args, output):
            run.stash[i] = output
        return hook

    def stage_forward(*received, model_inputs=((), {})):
        args, kwargs = model_inputs
        kwargs = trace_kwargs(model, dict(kwargs))
        flat = iter(received)
        run.received, run.stash = {}, {}
        run.device = next((t.device for t in [*received, *pytree.tree_leaves((args, kwargs))]
                           if isinstance(t, torch.Tensor)), None)
        for i in carried_in:
            spec, is_tensor = outputs[i]
            run.received[i] = pytree.tree_unflatten([next(flat) if x else None for x in is_tensor], spec)
        if carried_out is not None and not hooks:  # installed at the first call: after TP/FSDP hooks
            for i in carried_out:
                if c <= i < d:
                    hooks.append(root.get_submodule(names[i]).register_forward_hook(stash_hook(i)))
        try:
            output = forward(root, *args, **kwargs)
        except _StageExit:
            output = None
        if carried_out is None:
            return shape.flatten(output)
        values = []
        for i in carried_out:
            value = run.received[i] if i < c else run.stash[i]
            values += [t.contiguous() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
        run.received, run.stash = {}, {}
        return tuple(values)

    root.forward = stage_forward
    root.takes_model_inputs = True
    if carried_out is None:
        root.rebuild_output = shape.rebuild
