"""The layer chain: which modules are the links a pipeline may be cut between, and what each one costs.

Choosing the chain: the root's children, containers (``ModuleList``/``Sequential``/``ModuleDict``) opened into
their entries, and any single link that holds most of the parameters (a wrapper such as HF ``LlamaForCausalLM
.model``) or runs a stack of blocks (T5's and BART's encoder and decoder) opened in turn while that gives a finer
chain, looking through wrappers of one child (OPT's ``model.decoder``); links are ordered by their first call.

Attributing: an op or saved storage belongs to the link whose module (or an ancestor of it) was running; an
op outside every link (``tok(idx) + pos(arange)``) belongs to the link that ran last before it, or to the first
link when none has run yet.

Example:
    >>> import torch
    >>> from autoplan.trace.chain import choose_layer_names
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> choose_layer_names(m, {"": 0, "0": 1, "1": 2})
    ['0', '1']
"""

from __future__ import annotations

import bisect
import hashlib

import torch
from torch import nn

from ..names import in_module
from .measure import ModuleCall

__all__ = ["choose_layer_names", "LayerLocator", "first_owner_params", "layer_output_bytes"]

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def first_owner_params(model: nn.Module) -> dict[str, int]:
    """Parameter FQN → numel, each tensor once under its first name (a tied weight counts at its first owner)."""
    return {name: p.numel() for name, p in model.named_parameters()}


def _params_under(params: dict[str, int], prefix: str) -> int:
    return sum(n for name, n in params.items() if in_module(name, prefix))


def choose_layer_names(model: nn.Module, call_order: dict[str, int]) -> list[str]:
    """Module FQNs forming the layer chain, in order of first call (``call_order``: FQN → rank)."""
    modules = dict(model.named_modules())
    params = first_owner_params(model)
    total = sum(params.values())

    def called(name: str) -> bool:
        return not name or any(in_module(c, name) for c in call_order)

    def entries(name: str) -> list[str]:
        out = []
        for child_name, child in modules[name].named_children():
            fqn = f"{name}.{child_name}" if name else child_name
            if not called(fqn):
                continue
            out.extend(entries(fqn) if isinstance(child, _CONTAINERS) else [fqn])
        return out

    container_entries = {
        f"{name}.{c}" if name else c
        for name, mod in modules.items()
        if isinstance(mod, _CONTAINERS)
        for c, _ in mod.named_children()
    }
    chain = entries("") or [""]
    changed = True
    while changed and total > 0:
        changed = False
        for i, name in enumerate(chain):
            if name in container_entries or name == "":
                continue
            finer = entries(name)
            while len(finer) == 1 and finer[0] not in container_entries:  # a wrapper of a wrapper (OPT's
                finer = entries(finer[0])  # model.decoder): look through to its parts
            # open a link that holds most parameters, or one that runs a stack of blocks (T5's and BART's
            # encoder beside their decoder: neither holds most, both are stacks of layers)
            stack = sum(f in container_entries for f in finer) >= 2
            if len(finer) > 1 and (stack or 2 * _params_under(params, name) > total):
                chain[i:i + 1] = finer
                changed = True
                break
    first = min(call_order.values(), default=0)
    return sorted(chain, key=lambda n: _first_call(n, call_order, first))


def _first_call(name: str, call_order: dict[str, int], default: int) -> int:
    if name in call_order:
        return call_order[name]
    inner = [r for c, r in call_order.items() if c.startswith(name + ".")]
    return min(inner, default=default)


class LayerLocator:
    """Maps (module FQN, forward position) to the index of the layer an op or storage belongs to."""

    def __init__(self, names: list[str], calls: dict[str, ModuleCall]):
        self.names = names
        self._index = {n: i for i, n in enumerate(names)}
        windows = []
        for i, name in enumerate(names):
            call = calls.get(name) or _span(name, calls)
            windows.append((call[0], call[1], i) if isinstance(call, tuple) else (call.start, call.end, i))
        self._by_end = sorted((end, i) for _, end, i in windows)
        self._ends = [e for e, _ in self._by_end]
        self._by_start = sorted((start, i) for start, _, i in windows)
        self._starts = [s for s, _ in self._by_start]
        self._cache: dict[str, int | None] = {}

    def of_module(self, module: str) -> int | None:
        """Index of the layer that ``module`` lies in (None: outside every layer)."""
        if module not in self._cache:
            found = None
            probe = module
            while True:
                if probe in self._index:
                    found = self._index[probe]
                    break
                if probe == "":
                    break
                probe = probe.rpartition(".")[0]
            self._cache[module] = found
        return self._cache[module]

    def of_op(self, module: str, position: int) -> int:
        inside = self.of_module(module)
        if inside is not None:
            return inside
        k = bisect.bisect_right(self._ends, position)
        if k > 0:
            return self._by_end[k - 1][1]
        k = bisect.bisect_left(self._starts, position)
        return self._by_start[k][1] if k < len(self._by_start) else 0

    def totals(self, records, attr: str) -> list[int]:
        """Per layer, the sum of ``attr`` over ``records`` (anything with ``module`` and ``position``: ops,
        saved storages), each in the layer :meth:`of_op` places it.

        Example:
            >>> from autoplan.trace.measure import ModuleCall, OpRecord
            >>> loc = LayerLocator(["a", "b"], {"a": ModuleCall(0, 2, 0, 0), "b": ModuleCall(2, 4, 0, 1)})
            >>> loc.totals([OpRecord("a", 0, 5), OpRecord("b.fc", 3, 7), OpRecord("", 4, 1)], "flops")
            [5, 8]
        """
        sums = [0] * len(self.names)
        for rec in records:
            sums[self.of_op(rec.module, rec.position)] += getattr(rec, attr)
        return sums


def _span(name: str, calls: dict[str, ModuleCall]) -> tuple[int, int]:
    """Window of a module that was never called itself but whose children were (a ModuleList entry...)."""
    inner = [c for n, c in calls.items() if n.startswith(name + ".")]
    if not inner:
        return (0, 0)
    return (min(c.start for c in inner), max(c.end for c in inner))


def layer_output_bytes(op_graph, locator: LayerLocator) -> list[int]:
    """Bytes that a cut after each layer must send: tensors made at or before it and still read after it.

    Liveness on the op graph: a tensor made in layer ``a`` and last read in layer ``b`` crosses every cut
    ``a ≤ k < b``; model inputs count from the first layer, the model output crosses the last cut.
    """
    g = op_graph.nx
    n_layers = len(locator.names)
    layer_of: dict[str, int] = {}
    pending: list[str] = []
    last = None
    for name in op_graph.order:
        attrs = g.nodes[name]
        if attrs["op"] == "placeholder":
            layer_of[name] = -1
            continue
        if attrs["op"] == "output":
            layer_of[name] = n_layers
            continue
        inside = locator.of_module(attrs["module"])
        if inside is None:
            if last is None:
                pending.append(name)
                continue
            inside = last
        for p in pending:
            layer_of[p] = inside
        pending = []
        layer_of[name] = last = inside
    for p in pending:
        layer_of[p] = 0
    out = [0] * n_layers
    for name in op_graph.order:
        attrs = g.nodes[name]
        if not attrs["is_tensor"]:
            continue
        consumers = [layer_of[s] for s in g.successors(name)]
        if not consumers:
            continue
        start, stop = max(layer_of[name], 0), min(max(consumers), n_layers)
        for k in range(start, stop):
            out[k] += attrs["bytes"]
    return out


def layer_kind(model: nn.Module, name: str, figures: tuple) -> str:
    """Structural signature: class, sub-module tree, parameter shapes/dtypes and the measured figures.

    Equal for identical repeated layers (all blocks of a transformer), different otherwise.
    """
    module = model.get_submodule(name) if name else model
    h = hashlib.sha256()
    for sub_name, sub in module.named_modules():
        h.update(f"m:{sub_name}:{type(sub).__qualname__};".encode())
    for p_name, p in module.named_parameters(remove_duplicate=False):
        h.update(f"p:{p_name}:{tuple(p.shape)}:{p.dtype};".encode())
    for b_name, b in module.named_buffers(remove_duplicate=False):
        h.update(f"b:{b_name}:{tuple(b.shape)}:{b.dtype};".encode())
    h.update(repr(figures).encode())
    return f"{type(module).__name__}:{h.hexdigest()[:8]}"


def module_params(model: nn.Module, fqn: str) -> int:
    """Parameters of one module and its children (every tensor once)."""
    module = model.get_submodule(fqn) if fqn else model
    return sum(p.numel() for p in module.parameters())


def param_dtype_bytes(model: nn.Module) -> int:
    """Bytes per element of the floating-point parameters (the dtype holding most elements); 4 when none."""
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    if not sizes:
        return 4
    dtype = max(sizes, key=sizes.get)
    return torch.empty((), dtype=dtype, device="meta").element_size()
