"""Pinned hybrid layouts on 4 CPU ranks: dp2 × tp2, then pp2 × dp2, each checked against the same model trained
in one process.

    torchrun --standalone --nproc_per_node 4 examples/hybrid_layouts.py

Pinning a degree with ``mesh=`` leaves the rest (microbatches, schedule, stage cuts, tensor-parallel styles,
recompute, DDP vs FSDP) to the planner. A plan can also be written by hand with
``autoplan.execute.manual_plan`` and applied with ``autoplan.parallelize(model, plan=...)``.
"""

import torch

import autoplan
from autoplan.execute.batch import default_loss
from autoplan.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=128, seq_len=32, hidden=64, layers=4, heads=4)
STEPS = 5


def data():
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        t = torch.randint(0, CONFIG.vocab_size, (16, CONFIG.seq_len + 1), generator=g)
        yield t[:, :-1], t[:, 1:]


def fresh_model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


def single_process_losses() -> list[float]:
    model = fresh_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for inputs, targets in data():
        loss = default_loss(model(inputs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def train(mesh: dict) -> list[float]:
    inputs, _ = next(data())
    pm = autoplan.parallelize(fresh_model(), inputs, mesh=mesh)
    if torch.distributed.get_rank() == 0:
        print(pm.plan)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    losses = []
    for inputs, targets in data():
        losses.append(pm.train_step(inputs, targets))
        opt.step()
        opt.zero_grad()
    return losses


def main() -> None:
    expected = single_process_losses()
    for mesh in ({"dp": 2, "tp": 2}, {"pp": 2, "dp": 2}):
        losses = train(mesh)
        if torch.distributed.get_rank() == 0:
            worst = max(abs(a - b) / b for a, b in zip(losses, expected))
            print(f"{mesh}: losses {[round(x, 4) for x in losses]}; vs one process: max rel. diff {worst:.1e}\n")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
