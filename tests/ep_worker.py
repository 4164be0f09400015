"""One torchrun rank of the expert-parallel checks: tiny Mixtral / Qwen2-MoE trained with their experts sharded over
the data-parallel ranks (ep = dp = the world size), against one process; rank 0 writes the results.

    python -m torch.distributed.run --nproc_per_node 2 tests/ep_worker.py cases.json results.pt

Each case: a plan pinned by hand (``manual_plan``, no tracing) with ``expert_parallel`` = dp, or with
``"planned": true`` the one ``autoplan.plan(..., expert_parallel=True)`` finds, two AdamW steps over
two microbatches, the collectives of one step counted (``_c10d_functional`` ops; with ``"data_parallel": "fsdp"``
every c10d collective, by ``tests/comm_counter.py``, FSDP's own included; ``"fsdp_reshard": "microbatch"``: FSDP
reshards and reduce-scatters per microbatch), the experts this rank holds, and optionally a checkpoint / state-dict
round trip. ``"starve": n`` routes every token of Mixtral's layer ``n`` to the lower half of its experts (rank 1's
experts get none there). ``"meta": true`` builds the model on meta (each rank allocates and
initializes only its experts) and then loads the reference's initial weights with ``load_state_dict``. Every rank
computes the one-process reference itself.
"""

from __future__ import annotations

import math
import os
import sys

import torch
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, __file__.rsplit("/", 1)[0])

import autoplan  # noqa: E402
import models_hf  # noqa: E402
from autoplan.execute.manual import manual_plan  # noqa: E402
from distributed_helpers import serve_cases  # noqa: E402
from hf_worker import GLOBAL_BATCH, LR, batches, loss_fn, no_dropout, roundtrip  # noqa: E402

MICROBATCHES = 2
IGNORED = ("wait_tensor", "_wrap_tensor_autograd")  # bookkeeping, not collectives


def full_gradients(named) -> dict:
    """Every parameter's gradient, whole (a DTensor's gathered: collective)."""
    return {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for name, p in named}


def one_process(case: dict, data) -> tuple[list[float], dict, dict]:
    """The reference: AdamW over whole global batches in one process; its losses, first-step gradients and final
    state."""
    model = build(case)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, grads = [], {}
    for inputs, targets in data:
        loss = loss_fn(model(*inputs), targets)
        loss.backward()
        grads = grads or full_gradients(model.named_parameters())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads, {k: v.detach().clone() for k, v in model.state_dict().items()}


def build(case: dict, device=None) -> torch.nn.Module:
    torch.manual_seed(1234)
    more = {"experts_implementation": case["experts"]} if case.get("experts") else {}
    model, _ = models_hf.FAMILIES[case["family"]](device=device, **more)
    if "starve" in case:
        starve_upper_experts(model.model.layers[case["starve"]].mlp.gate)
    return no_dropout(model)


def starve_upper_experts(router: torch.nn.Module) -> None:
    """Route every token of this Mixtral router to experts ``[0, E/2)`` only (its logits for the others ``-inf``):
    under ep = 2 no token of the group reaches rank 1's experts in this layer, while the router stays trained."""

    def hook(module, args, output):
        logits = output[0]
        upper = torch.arange(logits.shape[-1], device=logits.device) >= logits.shape[-1] // 2
        probs = torch.softmax(logits.float().masked_fill(upper, float("-inf")), dim=-1)
        top, index = torch.topk(probs, module.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), index

    router.register_forward_hook(hook)


def counted_step(pm, opt, inputs, targets, every: bool = False) -> tuple[float, dict | list, dict]:
    """One training step, counting the functional collectives (``_c10d_functional`` ops) it dispatched, forward
    and backward, by op name. DDP's bucketed all-reduce is not one of them (its reducer calls the process group).
    ``every``: instead, every collective the process group ran, as sorted ``(kind, bytes)`` pairs."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "_c10d_functional" and func.__name__.split(".")[0] not in IGNORED:
                counts[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    if every:
        from comm_counter import counted_collectives

        with counted_collectives() as issued:
            loss = pm.train_step(inputs, targets)
        found: dict | list = sorted((c.kind, int(c.nbytes)) for c in issued)
    else:
        with Count():
            loss = pm.train_step(inputs, targets)
        found = dict(counts)
    grads = full_gradients(pm.named_parameters())
    opt.step()
    opt.zero_grad()
    return loss, found, grads


def run_case(case: dict) -> dict:
    data = batches(case["family"])
    model = build(case, "meta" if case.get("meta") else None)
    dp = int(os.environ["WORLD_SIZE"])
    kind = case.get("data_parallel", "ddp")
    if case.get("planned"):  # the planner's own layout with the experts sharded (autoplan.solve.experts)
        plan = autoplan.plan(model, data[0][0], cluster=autoplan.Cluster.preset("cpu", devices_per_node=dp),
                             global_batch_size=GLOBAL_BATCH, precision="fp32", expert_parallel=True,
                             data_parallel=kind)
    else:
        plan = manual_plan(model, [case.get("layers", [""])], dp=dp, global_batch_size=GLOBAL_BATCH,
                           microbatches=MICROBATCHES, data_parallel=kind, precision=case.get("precision", "fp32"))
        plan = plan.replace(expert_parallel=case.get("ep", dp), fsdp_reshard=case.get("fsdp_reshard", "step"))
    pm = autoplan.parallelize(model, data[0][0], loss_fn=loss_fn, plan=plan)
    if case.get("meta"):  # each rank allocated and initialized only its experts; now the reference's weights
        pm.load_state_dict(build(case).state_dict())
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    held = {name: tuple(p.to_local().shape) for name, p in pm.named_parameters() if "experts" in name}
    losses, counts, grads = [], {}, {}
    for inputs, targets in data:
        loss, step_counts, step_grads = counted_step(pm, opt, inputs, targets, every=kind == "fsdp")
        losses.append(loss)
        counts, grads = counts or step_counts, grads or step_grads
    state = pm.full_state_dict()
    result = {"losses": losses, "held": held, "counts": counts, "plan": pm.plan.to_dict()}
    if case.get("checkpoint"):
        result["roundtrip"] = roundtrip(pm, opt, data, state, case["checkpoint"])
    if state:  # rank 0
        ref_losses, ref_grads, ref_state = one_process(case, data)
        result["ref_losses"] = ref_losses
        # the gradients themselves (AdamW would hide a wrong scale): relative to the largest of each tensor
        result["grad_rel_diff"] = max((grads[k] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
                                      for k, g in ref_grads.items())
        diffs = {k: (state[k].float() - v.float()).abs().max().item() for k, v in ref_state.items() if k in state}
        if "starve" in case:  # the upper experts of that layer got no token: zero gradients here and in one process
            prefix = f"model.layers.{case['starve']}.mlp.experts."
            result["starved_grads"] = [g[prefix + p][g[prefix + p].shape[0] // 2:].abs().max().item()
                                       for g in (grads, ref_grads) for p in ("gate_up_proj", "down_proj")]
        result["missing"] = sorted(set(ref_state) - set(state))
        result["max_weight_diff"] = max(diffs.values())
        result["worst_weight"] = max(diffs, key=diffs.get)
        result["full_shapes"] = {k: tuple(v.shape) for k, v in state.items() if "experts" in k}
        if kind == "fsdp":
            result.update(charged(case, data, plan))
            result["units"] = sum(isinstance(m, FSDPModule) for root in pm.modules_on_rank for m in root.modules())
            # FSDP2 pads each weight's dim 0 to a multiple of dp (Qwen2-MoE's shared_expert_gate, [1, H]) and moves
            # the padding; the cost model charges the weights themselves
            result["padding_bytes"] = sum((-(-p.shape[0] // dp) * dp - p.shape[0]) * math.prod(p.shape[1:])
                                          * p.element_size() for name, p in pm.named_parameters()
                                          if "experts." not in name)
    return result


def charged(case: dict, data, plan) -> dict:
    """What the cost model charges for one step of ``plan`` (traced here: ~3 CPU-seconds), as
    ``(kind, bytes, count, axis)``: every collective (:func:`autoplan.cost.traffic.plan_collectives`) and the
    experts' dispatch among them."""
    from autoplan.cost.experts import expert_parallel_collectives
    from autoplan.cost.plan_cost import estimate_breakdown
    from autoplan.cost.traffic import plan_collectives

    graph = autoplan.trace(build(case), data[0][0])
    estimate_breakdown(graph, plan)  # priced without error
    rows = lambda got: [(c.kind, c.nbytes, c.count, c.axis) for c in got]  # noqa: E731
    return {"charged": rows(plan_collectives(graph, plan)[0]),
            "dispatch": rows(t for got in expert_parallel_collectives(graph, plan).values() for t in got)}


def case_name(case: dict) -> str:
    return (f"{case['family']}:{case.get('experts') or 'default'}{':meta' if case.get('meta') else ''}"
            f"{':' + case['data_parallel'] if case.get('data_parallel') else ''}"
            f"{':planned' if case.get('planned') else ''}{':starved' if 'starve' in case else ''}")


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable(all_threads=True)  # a rank that aborts in C++ (gloo) says where, before the others fail
    serve_cases(sys.argv[1], sys.argv[2], run_case, case_name)
