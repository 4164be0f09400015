"""Expert parallelism priced: the routed experts sharded over ``ep`` = dp ranks (:mod:`autoplan.execute.experts`).

What changes against the same layout without it (GShard, Lepikhin et al. 2020 §2.2; Megatron-Core's "allgather"
token dispatcher, which the executor runs):

- **Memory.** Each rank holds E/ep experts: the experts' weights, gradients and optimizer states are divided by
  ``ep`` (the dense part is held as before: whole under DDP, sharded by FSDP). Under FSDP (ep = dp) the experts
  are left out of it: never gathered, so neither FSDP's per-layer gathered weights nor the unsharded weights and
  gradient accumulators it keeps through a step of several microbatches count them. While an MoE layer runs, the
  group's gathered tokens and the partial sums of the local experts (``ep·T·H`` elements each) are transient
  buffers. In low precision the experts' matmuls read a cast copy of the local experts (autocast's under DDP, the
  dispatch's under FSDP), which autograd saves until the microbatch's backward: E/ep experts of every layer.
- **Gradient sync.** The experts' gradients leave DDP's all-reduce, or FSDP's all-gathers and reduce-scatters
  (each rank's are its own experts'); the dispatch's backward already summed every rank's contribution.
- **Dispatch.** Per experts module and microbatch, forward: all-gathers of the tokens (``ep·T·H``), of their
  top-k weights (``ep·T·k``) and indices (``ep·T·k`` int64), and a reduce-scatter of the partial sums
  (``ep·T·H``); backward: an all-gather of the output gradient and reduce-scatters of the tokens' and the
  weights' gradients — 4 all-gathers and 3 reduce-scatters, on the critical path (the executor issues them
  synchronously), over the dp group. A recomputed experts module issues its forward ones again.
  ``T`` is the tokens of one rank's microbatch; tokens travel at the traced dtype under DDP (autocast keeps the
  residual stream in the parameters' dtype) and at the compute dtype under FSDP's mixed precision.
- **FLOPs.** Unchanged when routing is even: each rank computes ``ep·T·k / ep`` routed pairs, as without it. An
  uneven router makes the busiest rank set the pace; a trace on random weights cannot tell how uneven.

Example (a synthetic two-layer graph whose first layer holds 8 experts of 1000 weights each):
    >>> from autoplan.graph import ExpertsLayer
    >>> from autoplan.synthetic import mlp_graph
    >>> graph = mlp_graph(widths=(64, 64, 64), batch=8)
    >>> graph.experts = {"layers.0": ExpertsLayer(1, 8, 2, 8000, tokens=8, hidden=64)}
    >>> got = dispatch_collectives(graph, "layers.0", ep=4, microbatch_size=2)   # 8 tokens of the group
    >>> [(c.kind, c.count) for c in got]
    [('all_gather', 2), ('all_gather', 1), ('all_gather', 1), ('reduce_scatter', 2), ('reduce_scatter', 1)]
    >>> [c.nbytes for c in got]     # tokens 8·64·4 B, top-k weights 8·2·4 B, indices 8·2·8 B
    [2048.0, 64.0, 128.0, 2048.0, 64.0]
"""

from __future__ import annotations

import weakref
from dataclasses import replace

from .. import cost
from ..errors import PlanMismatchError
from ..graph import ModelGraph
from ..names import in_module
from ..vocabulary import LOW_PRECISIONS, PRECISION_BYTES
from .collectives import Collective

__all__ = ["expert_params", "dispatch_collectives", "element_bytes", "expert_parallel_collectives",
           "expert_parallel_refusal", "with_expert_parallel", "experts_kernel", "kept_expert_copy_params"]

INDEX_BYTES = 8  # top-k indices are int64
# torch's grouped matmul as the trace records it: the aten op, or transformers' custom op it falls back to
GROUPED_MM_OPS = frozenset({"_grouped_mm", "grouped_mm", "grouped_mm_fallback"})


def expert_params(graph: ModelGraph, layers=None) -> int:
    """The routed experts' weights of ``layers`` (names; default: every layer of ``graph``).

    Example:
        >>> from autoplan.synthetic import mlp_graph
        >>> expert_params(mlp_graph(widths=(8, 8), batch=2))
        0
    """
    wanted = None if layers is None else set(layers)
    return sum(e.num_params for name, e in graph.experts.items() if wanted is None or name in wanted)


def experts_kernel(graph: ModelGraph, layer: str) -> str:
    """How the traced experts modules of ``layer`` multiply by their weights: ``"grouped_mm"`` (one grouped matmul
    over the 3-D weights, transformers' default), ``"batched_mm"`` (each routed pair's expert weights gathered by
    index, then ``bmm``) or ``"other"`` (any other op on the weights: ``F.linear`` per expert, ``einsum``). Read
    from the op graph; a stack traced once and replicated names only its first block's modules, whose kernel the
    others share.

    Example (a synthetic layer has no experts ops: "other"):
        >>> from autoplan.graph import ExpertsLayer
        >>> from autoplan.synthetic import mlp_graph
        >>> graph = mlp_graph(widths=(8, 8), batch=2)
        >>> graph.experts = {"layers.0": ExpertsLayer(1, 4, 2, 100, tokens=2, hidden=8, names=("layers.0",))}
        >>> experts_kernel(graph, "layers.0")
        'other'
    """
    found = _ops_in(graph, graph.experts[layer].names) or _ops_in(
        graph, tuple(n for e in graph.experts.values() for n in e.names))
    if found & GROUPED_MM_OPS:
        return "grouped_mm"
    if {"bmm", "index"} <= found:
        return "batched_mm"
    return "other"


# the op names inside some modules, per op graph: the planner prices many plans of one graph
_OPS_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _ops_in(graph: ModelGraph, names: tuple[str, ...]) -> frozenset[str]:
    """The ops (their names without overload) the op graph records inside the modules ``names``."""
    cached = _OPS_CACHE.setdefault(graph.nx_graph, {})
    if names not in cached:
        cached[names] = frozenset(str(d.get("target", "")).split(".")[0] for _, d in graph.nx_graph.nodes(data=True)
                                  if any(in_module(d.get("module", ""), name) for name in names))
    return cached[names]


def kept_expert_copy_params(graph: ModelGraph, layer: str, mixed_precision: str, ep: int = 1) -> int:
    """The expert weights of ``layer`` (its ``1/ep`` share) whose low-precision copy autograd keeps from a
    microbatch's forward to its backward on one rank, under ``mixed_precision``
    (:func:`autoplan.mixed_precision.mixed_precision_mode`), by the experts' kernel (:func:`experts_kernel`):

    - ``"autocast"`` (DDP, dp = 1): ``grouped_mm`` has no autocast kernel (transformers casts the tokens to the
      weights' fp32 instead), so it saves the fp32 parameters themselves: no copy; ``batched_mm`` casts each routed
      pair's gathered weights, which the trace counts as activations: no copy of the experts; any other kernel
      (``F.linear`` per expert, ``einsum``) goes through autocast's matmuls, which cast the weights' slices and
      save them: a copy of every expert (slices are not leaves, so autocast's cache does not share them).
    - ``"fsdp"``: without expert parallelism FSDP gathers low-precision experts with the layer and frees them after
      it (the layer's transient); with it the dispatch casts the local experts itself
      (:mod:`autoplan.execute.experts`): ``grouped_mm`` and the other kernels save that cast, ``batched_mm`` only
      indexes it (index saves no source): a copy except under ``batched_mm``.
    - ``"replicate"`` (DDP with TP or PP): its unsharded low-precision parameters, experts included, stay from
      forward to backward whatever the kernel: a copy.
    - ``"fp32"``: nothing is cast.

    Example:
        >>> from autoplan.graph import ExpertsLayer
        >>> from autoplan.synthetic import mlp_graph
        >>> graph = mlp_graph(widths=(8, 8), batch=2)
        >>> graph.experts = {"layers.0": ExpertsLayer(1, 4, 2, 100, tokens=2, hidden=8, names=("layers.0",))}
        >>> [kept_expert_copy_params(graph, "layers.0", m) for m in ("fp32", "autocast", "fsdp", "replicate")]
        [0, 100, 0, 100]
        >>> kept_expert_copy_params(graph, "layers.0", "fsdp", ep=4)
        25
    """
    e = graph.experts[layer]
    if mixed_precision == "fp32" or (mixed_precision == "fsdp" and ep <= 1):
        return 0
    if mixed_precision not in ("autocast", "fsdp", "replicate"):
        raise ValueError(f"unknown mixed precision {mixed_precision!r}; use what "
                         f"autoplan.mixed_precision.mixed_precision_mode returns")
    kernel = experts_kernel(graph, layer)
    kept = {"autocast": kernel == "other", "fsdp": kernel != "batched_mm", "replicate": True}[mixed_precision]
    return e.num_params // max(ep, 1) if kept else 0


def dispatch_collectives(graph: ModelGraph, layer: str, ep: int, microbatch_size: int,
                         recomputed: bool = False, element_bytes: int | None = None) -> list[Collective]:
    """The dispatch collectives of ``layer``'s experts modules for one microbatch of ``microbatch_size`` samples
    per rank, forward and backward, over ``ep`` ranks of the "dp" axis (see the module docstring).
    ``element_bytes``: of the tokens (default: the traced dtype's; see :func:`element_bytes`); the top-k weights
    travel at the traced dtype (Mixtral's router keeps its softmax in fp32; Qwen2-MoE's casts it back: at most 2×
    of ``T·k`` elements).

    Example: see the module docstring (a recomputed layer gathers its tokens, weights and indices once more).
    """
    e = graph.experts[layer]
    element = graph.dtype_bytes if element_bytes is None else element_bytes
    gathered = ep * e.tokens * microbatch_size / graph.batch_size  # tokens of the whole group
    tokens_bytes = gathered * e.hidden * element
    weights_bytes, index_bytes = gathered * e.top_k * graph.dtype_bytes, gathered * e.top_k * INDEX_BYTES
    forward = 2 if recomputed else 1
    n = e.modules

    def c(kind: str, nbytes: float, count: int) -> Collective:
        return Collective(kind, nbytes, count=count * n, group_size=ep, axis="dp")

    return [c("all_gather", tokens_bytes, forward + 1),      # tokens in forward, output gradient in backward
            c("all_gather", weights_bytes, forward), c("all_gather", index_bytes, forward),
            c("reduce_scatter", tokens_bytes, forward + 1),  # partial sums in forward, tokens' gradient backward
            c("reduce_scatter", weights_bytes, 1)]


def element_bytes(graph: ModelGraph, plan) -> int:
    """Bytes per element of the tokens the experts read under ``plan``: FSDP's mixed precision casts the model's
    inputs to the compute dtype, so the residual stream is low precision; under DDP's autocast it stays in the
    parameters' (the traced) dtype.

    Example:
        >>> import autoplan
        >>> from autoplan.synthetic import mlp_graph
        >>> plan = autoplan.Plan.example()
        >>> element_bytes(mlp_graph(widths=(8, 8), batch=2), plan.replace(precision="bf16"))   # DDP: fp32
        4
    """
    if plan.data_parallel == "fsdp" and plan.precision in LOW_PRECISIONS:
        return PRECISION_BYTES[plan.precision]
    return graph.dtype_bytes


def expert_parallel_collectives(graph: ModelGraph, plan) -> dict[str, list[Collective]]:
    """Per layer holding experts, the dispatch collectives of one microbatch under ``plan`` (its
    ``expert_parallel`` ranks, microbatch size, recompute and precision): what the step is priced from and what
    :func:`autoplan.cost.traffic.plan_collectives` lists.

    Example:
        >>> import autoplan
        >>> from autoplan.graph import ExpertsLayer
        >>> from autoplan.synthetic import mlp_graph
        >>> graph = mlp_graph(widths=(8, 8), batch=2)
        >>> graph.experts = {"layers.0": ExpertsLayer(1, 4, 2, 100, tokens=2, hidden=8)}
        >>> plan = autoplan.Plan.example()
        >>> sum(c.count for c in expert_parallel_collectives(graph, plan)["layers.0"])   # 4 + 3 per microbatch
        7
    """
    recomputed = set(plan.recompute)
    out = {}
    for name, e in graph.experts.items():
        again = any(in_module(module, rc) for module in e.names for rc in recomputed)
        out[name] = dispatch_collectives(graph, name, max(plan.expert_parallel, 1), plan.microbatch_size, again,
                                         element_bytes(graph, plan))
    return out


def expert_parallel_refusal(graph: ModelGraph, plan) -> str | None:
    """Why ``plan`` cannot shard ``graph``'s experts over ``plan.expert_parallel`` ranks (None: it can): the
    layouts the executor runs it with, a model without experts, a count of experts ep does not divide.

    Example:
        >>> import autoplan
        >>> from autoplan.synthetic import mlp_graph
        >>> expert_parallel_refusal(mlp_graph(widths=(8, 8), batch=2), autoplan.Plan.example()) is None
        True
    """
    from ..execute.experts import SUPPORTED

    ep, m = plan.expert_parallel, plan.mesh
    if ep <= 1:
        return None
    if m.tp > 1 or m.pp > 1 or plan.data_parallel not in ("ddp", "fsdp") or ep != m.dp:
        return f"expert parallelism runs with {SUPPORTED}; this plan has {m}, {plan.data_parallel}, ep={ep}"
    if not graph.experts:
        return "the model has no experts module (3-D gate_up_proj / down_proj weights and num_experts)"
    uneven = sorted({e.num_experts for e in graph.experts.values() if e.num_experts % ep})
    if uneven:
        return f"ep={ep} does not divide the {uneven[0]} experts of a layer"
    return None


def with_expert_parallel(graph: ModelGraph, plan, base):
    """``base`` (:func:`autoplan.cost.plan_cost.compose`'s answer for ``plan`` without expert parallelism) with
    ``plan.expert_parallel`` priced in: see the module docstring. ``PlanMismatchError`` when the plan cannot
    shard the experts (:func:`expert_parallel_refusal`).

    Example:
        >>> import autoplan
        >>> from autoplan.graph import ExpertsLayer
        >>> from autoplan.plan import Mesh, ModelInfo
        >>> from autoplan.synthetic import mlp_graph
        >>> from autoplan.cost.plan_cost import estimate_breakdown
        >>> graph = mlp_graph(widths=(256, 1024, 256), batch=32)
        >>> graph.experts = {"layers.0": ExpertsLayer(1, 4, 2, 200_000, tokens=32, hidden=256)}
        >>> plan = autoplan.Plan(model=ModelInfo("MLP", graph.fingerprint, graph.num_params),
        ...     cluster=autoplan.Cluster.preset("a100-80gb", devices_per_node=4), global_batch_size=32,
        ...     microbatch_size=8, microbatches=1, mesh=Mesh(dp=4), schedule="1f1b", data_parallel="ddp",
        ...     stages=(autoplan.Stage(("layers.0", "layers.1")),))
        >>> off, on = estimate_breakdown(graph, plan), estimate_breakdown(graph, plan.replace(expert_parallel=4))
        >>> off.ranks[0].num_params - on.ranks[0].num_params        # 3/4 of the experts live elsewhere
        150000
        >>> on.ranks[0].tp_comm_s > off.ranks[0].tp_comm_s          # the dispatch collectives
        True
    """
    reason = expert_parallel_refusal(graph, plan)
    if reason is not None:
        raise PlanMismatchError(f"cannot price expert parallelism: {reason}; re-plan with expert_parallel=False")
    from .layer_choice import layer_choice_cost, plan_layer_choices
    from .plan_cost import rank_state_bytes, rank_tail_s
    from .strategy import fsdp_gather_bytes, rank_optimizer_s

    ep, strategy, cluster = plan.expert_parallel, base.strategy, plan.cluster
    (rank,) = base.ranks  # pp = 1
    experts = expert_params(graph)
    dense = rank.num_params - experts
    fsdp = strategy.data_parallel == "fsdp"
    # num_params is before FSDP's sharding: under FSDP (ep = dp) the experts' 1/ep is FSDP's 1/dp already
    held = rank.num_params if fsdp else dense + experts // ep
    state = rank_state_bytes(strategy, dense) + cost.model_state_bytes(
        experts // ep, strategy.precision, strategy.optimizer, 1, "ddp")  # no FSDP gathering or holding
    comm_s, transient = 0.0, 0
    dispatch = expert_parallel_collectives(graph, plan)
    for name, collectives in dispatch.items():
        for c in collectives:
            run = cost.group_allgather_s if c.kind == "all_gather" else cost.group_reduce_scatter_s
            comm_s += c.count * run(c.nbytes, cluster, ep, strategy.tp)
    # each layer's transient: FSDP gathers its dense weights only; a layer with experts holds the group's gathered
    # tokens and partial sums
    element = element_bytes(graph, plan)
    (rows,) = plan_layer_choices(graph, plan)
    for layer, tp_on, option in rows:
        c = layer_choice_cost(graph, layer, cluster, strategy, tp_on, option)
        e = graph.experts.get(layer.name)
        own = e.num_params if e is not None else 0
        extra = 0 if e is None else int(2 * ep * e.tokens * plan.microbatch_size / graph.batch_size * e.hidden
                                        * element)
        transient = max(transient, c.transient_bytes + fsdp_gather_bytes(strategy, c.num_params - own) + extra)
    sync_s = rank.dp_sync_s - rank_tail_s(strategy, cluster, rank.num_params)[0] \
        + rank_tail_s(strategy, cluster, dense)[0]
    updated = (-(-dense // strategy.dp) if fsdp else dense) + experts // ep  # FSDP updates its shard only
    optimizer_s = rank_optimizer_s(strategy, cluster, updated)
    # in low precision the local experts' cast copy that their kernel saves, every layer's at once (autocast's under
    # DDP, the dispatch's under FSDP; kept_expert_copy_params)
    copy = sum(kept_expert_copy_params(graph, name, strategy.mixed_precision, ep)
               for name in graph.experts) * PRECISION_BYTES[plan.precision]
    new = replace(rank, num_params=held, tp_comm_s=rank.tp_comm_s + comm_s, dp_sync_s=sync_s,
                  optimizer_s=optimizer_s, model_state_bytes=state, transient_bytes=transient,
                  weight_copy_bytes=rank.weight_copy_bytes + copy)
    m = strategy.microbatches
    step = base.step_time_s + m * comm_s + new.tail_s - rank.tail_s
    stages = tuple(replace(s, comm_s=s.comm_s + comm_s) for s in base.stage_times)
    return replace(base, ranks=(new,), step_time_s=step, comm_s=base.comm_s + m * comm_s + sync_s - rank.dp_sync_s,
                   optimizer_s=optimizer_s, samples_per_s=base.global_batch_size / step if step > 0 else 0.0,
                   stage_times=stages)

