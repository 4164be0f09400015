"""The low-precision weight copy of DDP composed with tensor or pipeline parallelism: the executor runs FSDP2's
``replicate`` with ``MixedPrecisionPolicy(param_dtype=bf16)``, which keeps the unsharded bf16 copy of every
parameter from forward to backward, norms and embeddings included; autocast (DDP alone) copies the matmuls'
weights only. Measured on a world of one, against :func:`autoplan.cost.plan_cost.weight_copy_bytes`."""

from __future__ import annotations

import torch
import torch.distributed as dist

import autoplan
from autoplan.cost.plan_cost import Strategy, layer_choice_cost, weight_copy_bytes
from autoplan.execute.data_parallel import _mp_policy
from autoplan.models import GPT, GPTConfig

# untied: a world of one holds a tied pair as one tensor, which the per-layer count charges twice
CONFIG = GPTConfig(vocab_size=128, seq_len=16, hidden=32, layers=2, heads=4, tie_embeddings=False)


def held_bf16_bytes_after_forward(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the bf16 parameters ``replicate`` leaves in the module after a forward (what backward reads)."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        replicate(model, mesh=init_device_mesh("cpu", (1,)), mp_policy=_mp_policy("bf16"))
        model(x)
        held = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for m in model.modules() for p in m._parameters.values()
                if p is not None and p.dtype == torch.bfloat16}
    finally:
        dist.destroy_process_group()
    return sum(held.values())


def test_replicate_keeps_a_bf16_copy_of_every_parameter_and_is_charged_for_it():
    torch.manual_seed(0)
    model, x = GPT(CONFIG), torch.randint(0, CONFIG.vocab_size, (2, CONFIG.seq_len))
    graph = autoplan.trace(GPT(CONFIG), x)
    cluster = autoplan.Cluster.preset("cpu")

    def charged(strategy: Strategy) -> int:
        return sum(weight_copy_bytes(strategy, layer_choice_cost(graph, layer, cluster, strategy, False, None))
                   for layer in graph.layers)

    replicated = Strategy(2, 2, 1, 1, 2, "1f1b", "ddp", precision="bf16")  # pp = 2 × dp = 2: replicate
    autocast = Strategy(1, 2, 1, 1, 2, "1f1b", "ddp", precision="bf16")  # DDP alone: autocast
    assert replicated.mixed_precision == "replicate" and autocast.mixed_precision == "autocast"
    measured = held_bf16_bytes_after_forward(model, x)
    assert measured == 2 * sum(p.numel() for p in model.parameters())
    assert charged(replicated) == measured  # the norms and embeddings too, not only the matmuls
    assert 0 < charged(autocast) < measured
