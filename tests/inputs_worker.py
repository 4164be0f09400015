"""A model whose forward takes keyword inputs, its single-process reference, and one torchrun rank that trains it
with keyword inputs under dp2 and pp2 (tests/test_inputs.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/inputs_worker.py results.pt
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

VOCAB, SEQ, HIDDEN, BATCH, STEPS = 16, 6, 12, 8, 2


class KeywordModel(nn.Module):
    """``forward(input_ids, weights)``: token embeddings scaled per token, two linears, a vocabulary head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.fc1 = nn.Linear(HIDDEN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids, weights):
        h = self.emb(input_ids) * weights.unsqueeze(-1)
        h = torch.tanh(self.fc1(h))
        h = torch.tanh(self.fc2(h))
        return self.head(h)


def build() -> KeywordModel:
    torch.manual_seed(7)
    return KeywordModel()


def batches() -> list[tuple[dict, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        inputs = {"input_ids": ids, "weights": torch.rand(BATCH, SEQ, generator=g) + 0.5}
        out.append((inputs, torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)))
    return out


def reference() -> dict:
    """Losses and weights after STEPS SGD steps on one process over the whole batch."""
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for inputs, targets in batches():
        loss = nn.functional.cross_entropy(model(**inputs).reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def train(pm) -> dict:
    """STEPS SGD steps; the optimizer is built after the first step (a lazily planned pm has no parameters before)."""
    opt = torch.optim.SGD(pm.parameters(), lr=0.1) if pm.applied else None
    losses = []
    for inputs, targets in batches():
        losses.append(pm.train_step(inputs, targets))
        opt = opt or torch.optim.SGD(pm.parameters(), lr=0.1)
        opt.step()
        opt.zero_grad()
    return {"losses": losses, "state": pm.full_state_dict()}


def main(out: str) -> None:
    import autoplan
    from autoplan.execute.manual import manual_plan

    results = {}
    for name, layout in (("dp2", dict(stages=[["emb", "fc1", "fc2", "head"]], dp=2, microbatches=2)),
                         ("pp2", dict(stages=[["emb", "fc1"], ["fc2", "head"]], pp=2, microbatches=2))):
        model = build()
        pm = autoplan.parallelize(model, plan=manual_plan(model, global_batch_size=BATCH, **layout))
        results[name] = train(pm)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
