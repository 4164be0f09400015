"""Classic DDP's gradients are its communication buckets: the executor wraps with ``gradient_as_bucket_view=True``,
so a rank holds one gradient-sized buffer, which is what the cost model's gradient bytes count. DDP's default
keeps the buckets beside the gradients (a second gradient-sized buffer that no plan would charge). Checked on a
world of one, through the executor's own wrapper, over steps that zero the gradients to None between them."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from autoplan.cost.memory import state_bytes_per_param
from autoplan.execute.data_parallel import apply_data_parallel
from autoplan.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=128, seq_len=16, hidden=32, layers=2, heads=4)


def gradient_storages_after_steps(steps: int = 3) -> tuple[int, dict[int, int]]:
    """(parameters, {storage address: bytes}) of the gradients after ``steps`` AdamW steps under the executor's
    DDP, ``zero_grad(set_to_none=True)`` between them."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = GPT(CONFIG)
        ddp = apply_data_parallel(model, "ddp", init_device_mesh("cpu", (1,)), [], "fp32", composed=False)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        x = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.seq_len))
        for step in range(steps):
            if step:
                opt.step()
                opt.zero_grad(set_to_none=True)
            ddp(x).float().pow(2).mean().backward()
        params = list(model.parameters())
        storages = {p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage().nbytes() for p in params}
    finally:
        dist.destroy_process_group()
    return len(params), storages


def test_ddp_gradients_are_its_buckets_and_total_what_the_model_charges():
    num_tensors, storages = gradient_storages_after_steps()
    num_params = sum(p.numel() for p in GPT(CONFIG).parameters())
    # every gradient a view of a bucket: a few shared buffers, not one storage per parameter tensor
    assert len(storages) < num_tensors
    # and those buffers are exactly the gradients the cost model charges: no second gradient-sized buffer
    assert sum(storages.values()) == num_params * state_bytes_per_param("fp32", "adamw").grads
