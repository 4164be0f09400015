"""The op graph of a model: ``torch.fx.symbolic_trace`` first, ``torch.export`` (non-strict) when fx fails.

Both routes give a torch.fx graph; this module turns it into a networkx DiGraph whose nodes carry the op kind,
its target, the output shape and bytes (from a run on fake tensors) and the FQN of the innermost module that
ran it. Parameter and buffer nodes are left out: they are weights, not data flowing between ops.

Example:
    >>> import torch
    >>> from autoplan.trace.opgraph import build_op_graph
    >>> g = build_op_graph(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()), (torch.randn(2, 8),), {})
    >>> g.method, [g.nx.nodes[n]["module"] for n in g.order if g.nx.nodes[n]["op"] != "placeholder"]
    ('fx', ['0', '1', ''])
"""

from __future__ import annotations

import contextlib
import io
import linecache
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx
from torch.utils import _pytree as pytree

from ..errors import TraceError
from .measure import fake_inputs, fake_state

__all__ = ["OpGraph", "build_op_graph", "measure_error", "is_conv1d"]


@dataclass
class OpGraph:
    method: str  # "fx" or "export"
    nx: nx.DiGraph  # node name → attrs: op, target, shape, dtype, bytes, module, is_tensor, args (input names)
    order: list[str]  # node names in execution order (inputs first, "output" last)
    linear_of: dict[str, str]  # node name → FQN of the nn.Linear it applies (a Conv1D: its output node)
    embedding_of: dict[str, str]  # node name → FQN of the nn.Embedding it applies


def build_op_graph(model: torch.nn.Module, args: tuple, kwargs: dict) -> OpGraph:
    """Trace ``model`` into an :class:`OpGraph`; ``TraceError`` (chained) when neither fx nor export works."""
    try:
        with _quiet_torch_logs():
            return _from_fx(model, args, kwargs)
    except Exception as fx_error:  # noqa: BLE001 - any fx failure sends us to export
        try:
            with _quiet_torch_logs():
                return _from_export(model, args, kwargs)
        except Exception as export_error:
            raise _trace_error(model, fx_error, export_error) from export_error


# ---------------------------------------------------------------------------------------------------------- fx


class _FakeInterpreter(torch.fx.Interpreter):
    """Runs a symbolically traced module with fake parameters, leaving the real ones alone."""

    def __init__(self, gm: torch.fx.GraphModule, state: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.state = state
        self.values: dict[str, Any] = {}

    def run_node(self, n):
        value = super().run_node(n)
        self.values[n.name] = value
        return value

    def get_attr(self, target, args, kwargs):
        if target in self.state:
            return self.state[target]
        return super().get_attr(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        sub = self.fetch_attr(target)
        prefix = target + "."
        local = {k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)}
        return torch.func.functional_call(sub, local, args, kwargs, strict=False)


def _from_fx(model, args, kwargs) -> OpGraph:
    from torch._subclasses.fake_tensor import FakeTensorMode

    gm = torch.fx.symbolic_trace(model)
    with FakeTensorMode(allow_non_fake_inputs=True):
        state = fake_state(model)
        f_args, f_kwargs = fake_inputs(args, kwargs)
        interp = _FakeInterpreter(gm, state)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        env_args = list(f_args)
        for n in placeholders[len(f_args):]:
            if n.target in f_kwargs:
                env_args.append(f_kwargs[n.target])
            elif n.args:
                env_args.append(n.args[0])  # the default value the forward declares
            else:
                raise ValueError(f"forward argument {n.target!r} has no example input and no default")
        interp.run(*env_args)

    modules = dict(model.named_modules())
    graph = nx.DiGraph()
    order, linear_of, embedding_of = [], {}, {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            continue
        if n.op == "call_module":
            module = n.target
            mod = modules.get(n.target)
            if isinstance(mod, torch.nn.Linear):
                linear_of[n.name] = n.target
            elif isinstance(mod, torch.nn.Embedding):
                embedding_of[n.name] = n.target
        else:
            stack = n.meta.get("nn_module_stack") or {}
            module = list(stack.values())[-1][0] if stack else ""
        _add_node(graph, n, interp.values.get(n.name), module)
        order.append(n.name)
    return OpGraph("fx", graph, order, linear_of, embedding_of)


# ------------------------------------------------------------------------------------------------------ export


def _from_export(model, args, kwargs) -> OpGraph:
    from torch.export.graph_signature import InputKind

    ep = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
    weights = {
        spec.arg.name
        for spec in ep.graph_signature.input_specs
        if spec.kind != InputKind.USER_INPUT and hasattr(spec.arg, "name")
    }
    modules = dict(model.named_modules())
    graph = nx.DiGraph()
    order, linear_of, embedding_of, conv_output = [], {}, {}, {}
    for n in ep.graph.nodes:
        if n.op == "get_attr" or (n.op == "placeholder" and n.name in weights):
            continue
        stack = n.meta.get("nn_module_stack") or {}
        module = list(stack.values())[-1][0] if stack else ""
        mod = modules.get(module)
        if n.op == "call_function" and n.target == torch.ops.aten.linear.default and isinstance(mod, torch.nn.Linear):
            linear_of[n.name] = module
        if n.op == "call_function" and n.target == torch.ops.aten.embedding.default and isinstance(
            mod, torch.nn.Embedding
        ):
            embedding_of[n.name] = module
        if is_conv1d(mod):
            conv_output[module] = n.name  # its last op (the view back to (…, nf)) gives the projection's output
        _add_node(graph, n, n.meta.get("val"), module)
        order.append(n.name)
    linear_of.update({node: fqn for fqn, node in conv_output.items()})
    return OpGraph("export", graph, order, linear_of, embedding_of)


def is_conv1d(module) -> bool:
    """Whether ``module`` is a GPT-2-style ``Conv1D``: a linear layer whose weight is stored transposed, as
    ``(in_features, out_features)`` (``nx``, ``nf``), applied as ``addmm(bias, x, weight)``.

    Example:
        >>> from transformers.pytorch_utils import Conv1D
        >>> is_conv1d(Conv1D(8, 4)), is_conv1d(torch.nn.Linear(4, 8))
        (True, False)
    """
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


# ------------------------------------------------------------------------------------------------------ shared

_NOISY_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo",
                  "torch._subclasses.fake_tensor")


@contextlib.contextmanager
def _quiet_torch_logs():
    """fx and export log errors (fake-tensor stack dumps) and export prints its partial graph to stderr (twice)
    when it fails; the TraceError we raise says what matters, so a failed trace's stderr is dropped (a successful
    one's is passed on)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)  # what failed is in our TraceError, with the user's line
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
        sys.stderr.write(captured.getvalue())
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _add_node(graph: nx.DiGraph, n: torch.fx.Node, value: Any, module: str) -> None:
    is_tensor = isinstance(value, torch.Tensor)
    tensors = [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)] if n.op != "output" else []
    graph.add_node(
        n.name,
        op=n.op,
        target=n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target)),
        shape=tuple(value.shape) if is_tensor else None,
        dtype=str(value.dtype).replace("torch.", "") if is_tensor else None,
        bytes=sum(t.numel() * t.element_size() for t in tensors),
        module=module,
        is_tensor=is_tensor,
        args=tuple(a.name for a in pytree.tree_leaves((n.args, n.kwargs)) if isinstance(a, torch.fx.Node)),
    )
    for inp in n.all_input_nodes:
        if inp.name in graph:
            graph.add_edge(inp.name, n.name)


def _trace_error(model: torch.nn.Module, fx_error: Exception, export_error: Exception) -> TraceError:
    where = _user_frame(model, export_error) or _user_frame(model, fx_error)
    location = ""
    if where is not None:
        module_name, filename, lineno = where
        line = linecache.getline(filename, lineno).strip()
        location = f" in module {module_name!r} at {filename}:{lineno} (`{line}`)"
    first = str(export_error).strip().splitlines()[0] if str(export_error).strip() else type(export_error).__name__
    return TraceError(
        f"could not trace {type(model).__name__}{location}: {first.rstrip('.')}. "
        f"torch.fx.symbolic_trace failed ({type(fx_error).__name__}: "
        f"{str(fx_error).strip().splitlines()[0] if str(fx_error).strip() else ''}) and so did "
        "torch.export.export(strict=False). Ways out: make that module a leaf (trace around it), pass example "
        "inputs with other shapes or types, or replace data-dependent control flow (Python `if` on tensor values) "
        "with tensor ops such as torch.where or torch.cond."
    )


def measure_error(model: torch.nn.Module, error: Exception) -> TraceError:
    """The error for a model whose graph traced but whose forward/backward on fake tensors failed."""
    where = _user_frame(model, error)
    location = ""
    if where is not None:
        module_name, filename, lineno = where
        location = f" in module {module_name!r} at {filename}:{lineno} (`{linecache.getline(filename, lineno).strip()}`)"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return TraceError(
        f"could not run {type(model).__name__} on fake tensors{location}: {first}. Ways out: pass example inputs "
        "of the shapes and dtypes the model expects, and avoid reading tensor values in forward (.item(), "
        "Python `if` on tensors); such ops need real data and cannot be measured without running the model."
    )


def _user_frame(model: torch.nn.Module, error: Exception) -> tuple[str, str, int] | None:
    """(module FQN, file, line) of the deepest frame that runs a forward of one of ``model``'s modules in the
    user's code: a frame inside torch (``nn.Linear.forward``) gives way to the user's forward that called it."""
    names = {id(m): name for name, m in model.named_modules()}
    owned = []
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            owned.append((names[id(owner)] or type(model).__name__, frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    users = [f for f in owned if not _library_file(f[1])]
    if users or owned:
        return (users or owned)[-1]
    for summary in reversed(traceback.extract_tb(error.__traceback__)):
        if not _library_file(summary.filename):
            return (type(model).__name__, summary.filename, summary.lineno or 0)
    return None


def _library_file(filename: str) -> bool:
    """Whether ``filename`` is torch's or autoplan's own code (never where a user's model goes wrong)."""
    roots = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
    return os.path.abspath(filename).startswith(tuple(root + os.sep for root in roots))
