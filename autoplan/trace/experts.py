"""The routed experts of a traced mixture-of-experts model, per layer (:class:`autoplan.graph.ExpertsLayer`): how
many experts, their weights, the top-k and the tokens each experts module is called with — what the cost model
needs to price expert parallelism (:mod:`autoplan.cost.experts`).

The experts modules are found as the executor finds them (:func:`autoplan.execute.experts.expert_modules`); the
tokens are read from the op graph: an experts module's output holds one row of ``hidden`` values per token, the
smallest 2-D tensor of that width inside it (the routed copies it makes are top-k times as many).

Example:
    >>> import torch, autoplan
    >>> graph = autoplan.trace(torch.nn.Linear(4, 4), torch.randn(2, 4))
    >>> experts_by_layer(torch.nn.Linear(4, 4), graph)
    {}
"""

from __future__ import annotations

from torch import nn

from ..graph import ExpertsLayer, ModelGraph
from ..names import in_module

__all__ = ["experts_by_layer"]


def _top_k(model: nn.Module, fqn: str) -> int | None:
    parent = model.get_submodule(fqn.rpartition(".")[0]) if "." in fqn else model
    for owner in (parent, getattr(parent, "gate", None), getattr(parent, "router", None)):
        k = getattr(owner, "top_k", None)
        if isinstance(k, int) and k > 0:
            return k
    k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    return k if isinstance(k, int) and k > 0 else None


def _tokens(graph: ModelGraph, fqn: str, hidden: int, any_experts: list[str]) -> int | None:
    def rows(names: list[str]) -> list[int]:
        return [d["shape"][0] for _, d in graph.nx_graph.nodes(data=True)
                if isinstance(d.get("shape"), tuple) and len(d["shape"]) == 2 and d["shape"][1] == hidden
                and any(in_module(d.get("module", ""), name) for name in names)]

    # a stack traced once and replicated may name only its first block's modules: every block sees the same tokens
    found = rows([fqn]) or rows(any_experts)
    return min(found) if found else None


def experts_by_layer(model: nn.Module, graph: ModelGraph) -> dict:
    """``{layer name: ExpertsLayer}`` for the layers of ``graph`` that hold experts modules of ``model``; a layer
    whose tokens or top-k cannot be read is left out (the planner then never shards its experts).

    Example: see the module docstring.
    """
    from ..execute.experts import expert_modules

    modules = expert_modules(model)
    if not modules:
        return {}
    names = [fqn for fqn, _ in modules]
    found: dict[str, list] = {}
    for layer in graph.layers:
        for fqn, module in modules:
            if in_module(fqn, layer.name):
                found.setdefault(layer.name, []).append((fqn, module))
    result = {}
    for name, held in found.items():
        fqn, first = held[0]
        hidden = first.gate_up_proj.shape[-1]
        tokens, top_k = _tokens(graph, fqn, hidden, names), _top_k(model, fqn)
        if tokens is None or top_k is None:
            continue
        result[name] = ExpertsLayer(
            modules=len(held), num_experts=first.num_experts, top_k=top_k,
            num_params=sum(p.numel() for _, m in held for p in (m.gate_up_proj, m.down_proj)),
            tokens=tokens, hidden=hidden, names=tuple(f for f, _ in held))
    return result
