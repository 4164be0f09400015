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
- the first layer at or after ``d`` stops the forward; the stage returns the tensors carried across ``d``;
- a *free* layer (stateless, run at several places: T5's ``encoder.dropout``) is the original module in every
  stage; each of its calls between layers is made by one stage and carried from there like a layer's output
  (a later stage's call returns the received tensor, so every stage reads the same dropout mask).

Soundness is proven before any stage exists, by :func:`autoplan.trace.cut_proof.analyse_cuts` (one forward on
fake tensors that tags every tensor with the layers it derives from), which also says what each cut carries.

Example:
    >>> import torch
    >>> from autoplan.trace.skeleton import analyse_cuts, skeleton_stages
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> x = torch.randn(3, 4)
    >>> first, second = skeleton_stages(model, [["0"], ["1", "2"]], analyse_cuts(model, ["0", "1", "2"], (x,), {}))
    >>> torch.equal(second(*first(model_inputs=((x,), {})), model_inputs=((x,), {})), model(x))
    True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..names import in_module
from .adapters import trace_kwargs
from .cut_proof import CutAnalysis, analyse_cuts
from .measure import FakeKernels, describe_tensor, fake_inputs, fake_state

__all__ = ["CutAnalysis", "analyse_cuts", "skeleton_stages", "stands_in"]


# ------------------------------------------------------------------------------------------------ stage modules


class _StageExit(Exception):
    """Raised by the first layer after a stage to leave the model's forward early (caught by the stage)."""


class _Run:
    """One stage forward's state, shared by the stage and its stand-ins."""

    def __init__(self):
        self.received: dict[Any, Any] = {}  # carried in: layer index or free call -> value
        self.stash: dict[Any, Any] = {}  # made here and carried out
        self.stash_calls: set[tuple] = set()  # free calls this stage makes and carries out
        self.calls: dict[int, int] = {}  # free layer -> calls so far in this forward
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


class _Free(nn.Module):
    """A free layer in a stage: the original module (a registered child, so ``train()``/``eval()`` reach it) whose
    calls carried into this stage return the received tensors and whose calls carried out are kept."""

    def __init__(self, module: nn.Module, run: _Run, index: int):
        super().__init__()
        self.module, self._index = module, index
        object.__setattr__(self, "_run", run)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def forward(self, *args, **kwargs):
        run = self._run
        n = run.calls[self._index] = run.calls.get(self._index, 0) + 1
        if (self._index, n) in run.received:
            return run.received[(self._index, n)]
        output = self.module(*args, **kwargs)
        if (self._index, n) in run.stash_calls:
            run.stash[(self._index, n)] = output
        return output


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
            if i in analysis.free:  # runs wherever it is called; its carried calls come and go through run
                replace[name] = _Free(model.get_submodule(name), run, i)
                continue
            if c <= i < d or (i < c and i in analysis.replicated):
                continue
            role = "exit" if i >= d else "carried" if i in carried_in else "placeholder"
            replace[name] = _Stand(name, role, run, i, _meta_copy(model.get_submodule(name)))
        held = {id(p) for layer in names[c:d] for p in model.get_submodule(layer).parameters()}
        for name in _weights_outside_layers(model, names):  # e.g. BART's model.shared, tied to layers' weights
            if not held & {id(p) for p in model.get_submodule(name).parameters()}:
                replace[name] = _Stand(name, "placeholder", run, -1, _meta_copy(model.get_submodule(name)))
        root = _skeleton(model, "", replace)
        _make_stage(root, model, run, names, (c, d), (carried_in, carried_out), analysis)
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
                carried: tuple[list, list | None], analysis: CutAnalysis) -> None:
    forward = type(model).forward
    (c, d), (carried_in, carried_out) = span, carried
    outputs, position = analysis.outputs, analysis.position
    run.stash_calls = {v for v in carried_out or () if not isinstance(v, int)}
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
        run.received, run.stash, run.calls = {}, {}, {}
        run.device = next((t.device for t in [*received, *pytree.tree_leaves((args, kwargs))]
                           if isinstance(t, torch.Tensor)), None)
        for i in carried_in:
            spec, is_tensor = outputs[i]
            run.received[i] = pytree.tree_unflatten([next(flat) if x else None for x in is_tensor], spec)
        if carried_out is not None and not hooks:  # installed at the first call: after TP/FSDP hooks
            for i in carried_out:
                if isinstance(i, int) and c <= i < d:
                    hooks.append(root.get_submodule(names[i]).register_forward_hook(stash_hook(i)))
        try:
            output = forward(root, *args, **kwargs)
        except _StageExit:
            output = None
        if carried_out is None:
            return shape.flatten(output)
        values = []
        for i in carried_out:
            value = run.received[i] if position(i) < c else run.stash[i]
            values += [t.contiguous() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
        run.received, run.stash = {}, {}
        return tuple(values)

    root.forward = stage_forward
    root.takes_model_inputs = True
    if carried_out is None:
        root.rebuild_output = shape.rebuild
