"""Quickstart: hand autoplan an unmodified model and train it.

    python examples/quickstart.py                              # one process
    torchrun --standalone --nproc_per_node 2 examples/quickstart.py   # two CPU ranks (gloo)

``autoplan.parallelize(model)`` is given no example inputs: the first ``train_step`` plans with its batch (on
rank 0, broadcast to every rank) and applies the plan, so the optimizer is built after that first step.
"""

import logging

import torch

import autoplan
from autoplan.models import MLP


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    model = MLP(features=32, hidden=128, depth=4)
    target_net = torch.nn.Linear(32, 32)  # the function to learn, the same on every rank (same seed)

    pm = autoplan.parallelize(model)
    opt = None
    generator = torch.Generator().manual_seed(1)
    for step in range(30):
        inputs = torch.randn(64, 32, generator=generator)  # the global batch, identical on every rank
        with torch.no_grad():
            targets = target_net(inputs)
        loss = pm.train_step(inputs, targets)
        opt = opt or torch.optim.AdamW(pm.parameters(), lr=3e-3)
        opt.step()
        opt.zero_grad()
        if step == 0 and is_rank0():
            print(pm.plan)
        if step % 10 == 9 and is_rank0():
            print(f"step {step + 1:3d}  loss {loss:.4f}")


if __name__ == "__main__":
    main()
