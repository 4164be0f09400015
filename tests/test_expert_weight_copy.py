"""The low-precision copy of the experts' weights that mixed precision keeps for backward, by the experts' kernel,
against what autograd really saves: tiny Mixtral under ``torch.autocast("cpu", bfloat16)`` with each kernel
transformers offers (``grouped_mm``, ``batched_mm``, ``eager``), the cast the expert-parallel dispatch makes under
FSDP, and what the cost model charges for expert parallelism (:func:`autoplan.cost.experts.kept_expert_copy_params`).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers", reason="the MoE families need transformers")

import autoplan  # noqa: E402
import models_hf  # noqa: E402
from autoplan.cost.experts import experts_kernel, kept_expert_copy_params  # noqa: E402
from autoplan.cost.plan_cost import estimate_breakdown  # noqa: E402
from autoplan.execute.manual import manual_plan  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

BATCH = 4  # 64 tokens, 2 of 4 experts each: every expert is hit


class SavedCasts(TorchDispatchMode):
    """The low-precision casts (``_to_copy``) of the experts' weights, by output storage."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.sources = {w.untyped_storage().data_ptr() for w in weights}
        self.casts: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() in self.sources:
            self.casts[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
        return out


def expert_weights(model) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if ".experts." in name]


def kept_cast_bytes(weights: list[torch.Tensor], run) -> int:
    """Bytes of the low-precision casts of ``weights`` that autograd saves for backward while ``run()`` runs
    forward."""
    saved: set[int] = set()

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    mode = SavedCasts(weights)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
        run()
    return sum(nbytes for ptr, nbytes in mode.casts.items() if ptr in saved)


def mixtral(kernel: str):
    torch.manual_seed(0)
    model, _ = models_hf.hf_mixtral(experts_implementation=kernel, use_cache=False)
    return model, torch.randint(0, models_hf.VOCAB, (BATCH, models_hf.SEQ))


@pytest.mark.parametrize("kernel, copies", [("grouped_mm", 0), ("batched_mm", 0), ("eager", 1)])
def test_autocast_keeps_a_copy_of_the_experts_only_where_their_kernel_casts_them(kernel, copies):
    model, ids = mixtral(kernel)
    experts = sum(w.numel() for w in expert_weights(model))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids)

    # grouped_mm has no autocast kernel: transformers casts the tokens to the fp32 weights, which it saves as they
    # are; batched_mm casts each routed pair's gathered weights (activations), not the experts; eager's F.linear
    # casts each expert's slice and saves it (not a leaf: autocast's cache does not share it)
    assert kept_cast_bytes(expert_weights(model), forward) == copies * 2 * experts


@pytest.mark.parametrize("kernel, kept", [("grouped_mm", True), ("batched_mm", False), ("eager", True)])
def test_the_expert_parallel_dispatch_cast_under_fsdp_is_kept_unless_the_kernel_only_indexes_it(kernel, kept):
    model, _ = mixtral(kernel)
    module = model.model.layers[0].mlp.experts
    tokens = torch.randn(BATCH * models_hf.SEQ, models_hf.HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    index = torch.stack([torch.randperm(module.num_experts)[:2] for _ in range(len(tokens))])
    weights = torch.rand(len(tokens), 2, dtype=torch.bfloat16)

    def forward():  # what autoplan.execute.experts runs on a rank under FSDP's mixed precision
        params = {name: getattr(module, name).to(torch.bfloat16) for name in ("gate_up_proj", "down_proj")}
        torch.func.functional_call(module, params, (tokens, index, weights))

    local = [module.gate_up_proj, module.down_proj]
    assert kept_cast_bytes(local, forward) == (2 * sum(w.numel() for w in local) if kept else 0)


@pytest.mark.parametrize("kernel", ["grouped_mm", "batched_mm"])
def test_expert_parallel_charges_the_copy_the_traced_kernel_keeps(kernel):
    model, ids = mixtral(kernel)
    graph = autoplan.trace(model, {"input_ids": ids})
    assert {experts_kernel(graph, name) for name in graph.experts} == {kernel}
    experts = sum(e.num_params for e in graph.experts.values())
    layers = [layer.name for layer in graph.layers]

    def copy_bytes(data_parallel: str, ep: int) -> int:
        plan = manual_plan(model, [layers], dp=2, global_batch_size=BATCH, precision="bf16",
                           data_parallel=data_parallel).replace(expert_parallel=ep)
        return estimate_breakdown(graph, plan).ranks[0].weight_copy_bytes

    # DDP runs autocast: neither kernel keeps a copy of the experts, sharded or not
    assert copy_bytes("ddp", 2) == copy_bytes("ddp", 1)
    # FSDP: the dispatch casts the local experts, which grouped_mm saves and batched_mm only indexes
    assert copy_bytes("fsdp", 2) - copy_bytes("fsdp", 1) == (experts if kernel == "grouped_mm" else 0)
    for name in graph.experts:
        assert kept_expert_copy_params(graph, name, "replicate") == graph.experts[name].num_params
        assert kept_expert_copy_params(graph, name, "autocast") == 0
