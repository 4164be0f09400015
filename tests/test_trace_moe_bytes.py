"""Activation bytes of mixture-of-experts layers: what autograd keeps for backward, each storage once, against a
closed form written from the layer's code, for both expert kernels transformers offers (grouped and batched
matmuls) in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="the MoE families need transformers")

import models_hf  # noqa: E402
from autoplan.trace.measure import measure  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

F32, I64, I32 = 4, 8, 4


def moe_block_saved_bytes(family: str, experts: str, T: int, H: int, I: int, E: int, k: int, b: int,
                          shared_I: int = 0) -> int:
    """Bytes autograd saves in one MoE block (router, experts, Qwen2-MoE's shared expert) for T tokens of hidden
    size H, expert width I, E experts, top-k routing, b bytes per compute element."""
    S = T * k  # routed (token, expert) pairs
    routing_b = F32 if family == "mixtral" else b  # Qwen2-MoE casts the routing weights to the compute dtype
    # router: its input (the block's input, first saved here), the softmax probabilities (fp32) and top-k indices
    total = T * H * b + T * E * F32 + T * k * I64
    if family == "mixtral":  # top-k weights renormalised: the division keeps the sum and the top-k values (fp32)
        total += T * F32 + T * k * F32
    # both kernels: the experts' input rows (S×H), the gate/up output (S×2I) read by chunk + SiLU, the SiLU output
    # and the product (S×I each), the down output (S×H) and the routing weights (S) of the weighted sum
    total += 2 * S * H * b + S * 2 * I * b + 2 * S * I * b + S * routing_b
    if experts == "grouped_mm":
        # the sort of the routed pairs by expert and its inverse (S int64 each), the per-expert offsets (E int32)
        # and the index that scatters results back to tokens (S int64)
        total += 3 * S * I64 + E * I32
    else:
        # batched_mm gathers each pair's expert weights, gate/up (2I×H) and down (H×I), and bmm keeps them for the
        # input gradient: 3·I·H elements per routed pair — real memory of this kernel, not a counting artefact
        total += 3 * S * I * H * b
    if shared_I:  # Qwen2-MoE's shared expert: gate, up, SiLU and product (T×Is each); its sigmoid gate and output
        total += 4 * T * shared_I * b + T * b + T * H * b
    return total


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_saved_bytes_equal_the_closed_form_for_grouped_and_batched_experts_in_fp32_and_bf16(family):
    for experts in ("grouped_mm", "batched_mm"):
        for dtype in (torch.float32, torch.bfloat16):
            model, inputs = models_hf.FAMILIES[family](num_hidden_layers=1)
            model.set_experts_implementation(experts)
            model.to(dtype)
            config = model.config
            m = measure(model, (), {**inputs, "use_cache": False})
            got = sum(r.nbytes for r in m.saved if r.module.startswith("model.layers.0.mlp"))
            tokens = inputs["input_ids"].numel()
            if family == "mixtral":
                want = moe_block_saved_bytes(family, experts, tokens, config.hidden_size, config.intermediate_size,
                                             config.num_local_experts, config.num_experts_per_tok, dtype.itemsize)
            else:
                want = moe_block_saved_bytes(family, experts, tokens, config.hidden_size,
                                             config.moe_intermediate_size, config.num_experts,
                                             config.num_experts_per_tok, dtype.itemsize,
                                             config.shared_expert_intermediate_size)
            assert got == want, (experts, dtype, got, want)
