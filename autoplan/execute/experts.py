"""Expert parallelism: the routed experts of a mixture-of-experts model sharded over the data-parallel ranks.

A transformers MoE block (Mixtral, Qwen2-MoE, …) routes each token to its top-k experts and calls its experts module
as ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``; the module holds every expert's
weights as 3-D parameters (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]). With expert parallelism over
``ep`` = dp ranks, rank ``r`` of the data-parallel group holds experts ``[r·E/ep, (r+1)·E/ep)`` only, and each call
runs Megatron-Core's "allgather" token dispatcher with torch's autograd-aware functional collectives:

1. all-gather the group's tokens, their top-k indices and weights (``all_gather_single_autograd``): every rank
   sees the ``ep·T`` tokens of the group;
2. run the module's own forward (whichever ``experts_implementation`` the model uses: ``eager``, ``batched_mm``,
   ``grouped_mm``) on the local experts only: a pair routed to another rank's expert gets the sentinel index
   ``E/ep`` and weight 0, which every transformers implementation skips (the same convention transformers' own
   expert parallelism uses, ``_is_expert_parallel``);
3. reduce-scatter the partial sums back (``reduce_scatter_single_autograd``): rank ``r`` gets, for its own ``T``
   tokens, the sum over all experts.

Backward is the same collectives' autograd: the output gradient is all-gathered, the gathered inputs' gradients
reduce-scattered. So an expert's gradient is the sum of every rank's loss gradient; the data-parallel wrapper
averages the other weights over dp, so the experts' local gradients are scaled by 1/ep (= 1/dp) and kept out of
the data-parallel sync (DDP's ignore list; FSDP's ``ignored_params``, so that FSDP neither shards, gathers nor
casts them: under its mixed precision the dispatch casts the local experts to the compute dtype itself). The
sharded weights are DTensors (``Shard(0)`` over the dp mesh):
``full_state_dict``, ``load_state_dict`` and distributed checkpoints handle them as any sharded weight.

Every rank builds the same backward collectives, whatever the routing: where no pair of the gathered tokens goes to
this rank's experts, the eager implementation returns ``zeros_like(tokens)``, unconnected to the tokens, top-k weights
or experts, so this rank's autograd would skip the all-gathers' reduce-scatters and the reduce-scatter's all-gather
that the other ranks issue (tiny Mixtral on 2 gloo ranks, every token of layer 0 routed to rank 0's experts: the
step hung). The partial is therefore added an exact zero, the sum of empty slices of the gathered tokens, top-k
weights and local expert weights: no value changes (``x + 0.0``), no collective is added, and the unused experts
get a zero gradient, as in one process.

Each collective is waited where it is issued (``wait_tensor``, autograd-aware), not left in flight as an
``AsyncCollectiveTensor`` until its first use: on gloo under torch.profiler (the tests' collective counter), dispatch
collectives left running in gloo's worker threads while this thread went on came with heap corruption (``malloc():
unaligned tcache chunk detected``, a rank aborting at the combine's reduce-scatter) in 3 of 7 runs of 200 steps on 2
loaded ranks (none of 3 unprofiled), and in none of 10 with the waits. Each result is used right after its
collective, so no overlap is lost.

Example (which modules of a model would be sharded; a module without 3-D expert weights has none):
    >>> import torch
    >>> expert_modules(torch.nn.Linear(2, 2))
    []
"""

from __future__ import annotations

from types import MethodType

import torch
from torch import nn

from ..errors import PlanMismatchError

__all__ = ["expert_modules", "check_expert_parallel", "apply_expert_parallel", "expert_parameter_names",
           "sharded_expert_parameters", "fill_expert_gradients", "SUPPORTED"]

#: What expert parallelism has been checked against one process with: data parallelism alone (classic DDP, or
#: FSDP2 for the dense part with the experts left out of it).
SUPPORTED = "dp only (tp = 1, pp = 1), data_parallel 'ddp' or 'fsdp', ep = dp"


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The experts modules of ``model`` (FQN, module): an integer ``num_experts`` and 3-D ``gate_up_proj`` and
    ``down_proj`` parameters with ``num_experts`` rows, as transformers' Mixtral / Qwen2-MoE / DeepSeek experts.

    Example:
        >>> class Experts(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.num_experts = 4
        ...         self.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 6, 2))
        ...         self.down_proj = torch.nn.Parameter(torch.zeros(4, 2, 3))
        >>> [name for name, _ in expert_modules(torch.nn.ModuleDict({"experts": Experts()}))]
        ['experts']
    """
    found = []
    for name, module in model.named_modules():
        if getattr(module, "_autoplan_ep", None) is not None:  # already sharded: num_experts is the local count
            found.append((name, module))
            continue
        count = getattr(module, "num_experts", None)
        params = dict(module.named_parameters(recurse=False))
        up, down = params.get("gate_up_proj"), params.get("down_proj")
        if isinstance(count, int) and up is not None and down is not None and up.dim() == 3 and down.dim() == 3 \
                and up.shape[0] == down.shape[0] == count:
            found.append((name, module))
    return found


def check_expert_parallel(model: nn.Module, plan) -> None:
    """Refuse ``plan.expert_parallel > 1`` where it cannot run exactly, before anything is changed:
    :class:`autoplan.PlanMismatchError` naming the cause and the fix.

    Example:
        >>> import autoplan
        >>> plan = autoplan.Plan.example()
        >>> check_expert_parallel(torch.nn.Linear(2, 2), plan)      # expert_parallel = 1: nothing to check
    """
    ep = plan.expert_parallel
    if ep <= 1:
        return
    m = plan.mesh
    fix = "re-plan with expert_parallel=False, or with autoplan.plan(..., expert_parallel=True) on a dp-only mesh"
    if m.tp > 1 or m.pp > 1 or plan.data_parallel not in ("ddp", "fsdp") or ep != m.dp:
        raise PlanMismatchError(
            f"the plan shards experts over ep={ep} ranks on mesh {m} with data_parallel={plan.data_parallel!r}; "
            f"expert parallelism runs only with {SUPPORTED}; {fix}")
    modules = expert_modules(model)
    if not modules:
        raise PlanMismatchError(
            f"the plan shards experts over ep={ep} ranks but the model has no experts module (a module with an "
            f"integer num_experts and 3-D gate_up_proj / down_proj weights, as transformers' Mixtral or "
            f"Qwen2-MoE); {fix}")
    for name, module in modules:
        if module.num_experts % ep:
            raise PlanMismatchError(
                f"{name} has {module.num_experts} experts, which ep={ep} ranks cannot share evenly; use an ep "
                f"(= dp) that divides {module.num_experts}, or {fix}")
        if not hasattr(module, "_is_expert_parallel"):
            raise PlanMismatchError(
                f"{name} ({type(module).__name__}) does not take transformers' expert-parallel routing (no "
                f"_is_expert_parallel attribute: its forward would not skip another rank's experts); {fix}")
        extra = [n for n, p in module.named_parameters() if n not in ("gate_up_proj", "down_proj")]
        if extra:
            raise PlanMismatchError(f"{name} holds parameters {extra} besides gate_up_proj and down_proj "
                                    f"(expert biases), which expert parallelism does not shard; {fix}")


def expert_parameter_names(model: nn.Module) -> list[str]:
    """FQNs of the experts' weights that expert parallelism shards.

    Example:
        >>> expert_parameter_names(torch.nn.Linear(2, 2))
        []
    """
    return [f"{name}.{p}" if name else p for name, _ in expert_modules(model) for p in ("gate_up_proj", "down_proj")]


def sharded_expert_parameters(root: nn.Module) -> set[nn.Parameter]:
    """The expert weights :func:`apply_expert_parallel` sharded in ``root`` (what FSDP must leave alone).

    Example:
        >>> sharded_expert_parameters(torch.nn.Linear(2, 2))
        set()
    """
    return {getattr(module, pname) for _, module in expert_modules(root)
            if getattr(module, "_autoplan_ep", None) is not None for pname in ("gate_up_proj", "down_proj")}


def apply_expert_parallel(root: nn.Module, dp_mesh, ep: int) -> int:
    """Shard every experts module of ``root`` over the 1-D ``dp_mesh`` (``ep`` = its size; checked first by
    :func:`check_expert_parallel`) and keep their weights out of DDP's gradient sync; returns how many modules.
    Works on meta modules too (the shards stay on meta until materialized).

    Example (under torchrun, 4 ranks): ``apply_expert_parallel(model, mesh["dp"], 4)``
    """
    from torch.distributed.tensor import DTensor, Shard
    from torch.nn.parallel import DistributedDataParallel

    rank = dp_mesh.get_local_rank()
    modules = expert_modules(root)
    for _, module in modules:
        total = module.num_experts
        local = total // ep
        for pname in ("gate_up_proj", "down_proj"):
            full = getattr(module, pname)
            shard = full.detach()[rank * local:(rank + 1) * local].clone()
            sharded = DTensor.from_local(shard, dp_mesh, [Shard(0)], run_check=False, shape=full.shape,
                                         stride=full.stride())
            module.register_parameter(pname, nn.Parameter(sharded, requires_grad=full.requires_grad))
        module.num_experts = local
        module._is_expert_parallel = True  # transformers' kernels skip (batched_mm: zero-weight) sentinel pairs
        module._autoplan_ep = (dp_mesh.get_group(), ep, rank * local, total)
        module._autoplan_ep_inner = False
        module._autoplan_ep_dtype = None  # FSDP's mixed-precision compute dtype (autoplan.execute.data_parallel)
        module.forward = MethodType(_dispatched_forward(module.forward), module)
    ignored = list(getattr(root, "_ddp_params_and_buffers_to_ignore", [])) + expert_parameter_names(root)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(root, ignored)
    return len(modules)


def _dispatched_forward(original):
    """The experts module's forward wrapped in the all-gather dispatch and reduce-scatter combine."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self._autoplan_ep_inner:  # the call below, through functional_call
            return original(hidden_states, top_k_index, top_k_weights)
        from torch.distributed import _functional_collectives as funcol

        group, ep, first, total = self._autoplan_ep
        local = self.num_experts
        wait = funcol.wait_tensor  # each collective waited at once: see the module's docstring
        tokens = wait(funcol.all_gather_single_autograd(hidden_states.contiguous(), 0, group))
        weights = wait(funcol.all_gather_single_autograd(top_k_weights.contiguous(), 0, group))
        index = wait(funcol.all_gather_single(top_k_index.contiguous(), 0, group)) - first
        elsewhere = (index < 0) | (index >= local)
        index = index.masked_fill(elsewhere, local)  # the sentinel every transformers implementation skips
        weights = weights.masked_fill(elsewhere, 0.0)
        params = {}
        for pname in ("gate_up_proj", "down_proj"):
            weight = getattr(self, pname).to_local()
            if weight.requires_grad:
                # every rank's loss reaches these experts, but DDP and FSDP average the rest over dp = ep ranks
                weight.register_hook(lambda grad: grad / ep)
            if self._autoplan_ep_dtype is not None:  # FSDP casts the rest; its gradient comes back in fp32
                weight = weight.to(self._autoplan_ep_dtype)
            params[pname] = weight
        self._autoplan_ep_inner = True
        try:
            partial = torch.func.functional_call(self, params, (tokens, index, weights))
        finally:
            self._autoplan_ep_inner = False
        # an exact zero that ties the partial to the gathered inputs and local experts on every rank, routed pairs
        # or none: see the module's docstring
        partial = partial + sum(t[:0].sum() for t in (tokens, weights, *params.values())).to(partial.dtype)
        return wait(funcol.reduce_scatter_single_autograd(partial.contiguous(), "sum", 0, group))

    return forward


def fill_expert_gradients(modules: list[nn.Module]) -> None:
    """Give a zero gradient to sharded expert weights that got none in a step (no token of the group was routed to
    this rank's experts): one process would have a gradient (zero rows) for them, and the optimizer must treat
    them alike (weight decay, moment decay).

    Example:
        >>> fill_expert_gradients([torch.nn.Linear(2, 2)])     # no experts: nothing to do
    """
    for root in modules:
        for _, module in expert_modules(root):
            if getattr(module, "_autoplan_ep", None) is None:
                continue
            for pname in ("gate_up_proj", "down_proj"):
                p = getattr(module, pname)
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
