"""Train a small GPT on a text corpus with an automatic plan, on 4 CPU ranks.

    torchrun --standalone --nproc_per_node 4 examples/train_gpt.py
    torchrun --standalone --nproc_per_node 4 examples/train_gpt.py --steps 100 --pp 2   # pin part of the mesh

Tokens are the corpus bytes (examples/data/corpus.txt, vocabulary 256). Rank 0 plans for this job
(``Cluster.detect()``), every rank applies the plan; the script prints the plan, the loss as it falls and the
training throughput in tokens/s.
"""

import argparse
import logging
import time
from pathlib import Path

import torch

import autoplan
from autoplan.models import GPT, GPTConfig

CORPUS = Path(__file__).with_name("data") / "corpus.txt"


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        window = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--pp", type=int, default=None, help="pin the pipeline degree")
    parser.add_argument("--tp", type=int, default=None, help="pin the tensor-parallel degree")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data = torch.tensor(list(CORPUS.read_bytes()), dtype=torch.long)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = GPT(GPTConfig(vocab_size=256, seq_len=args.seq, hidden=64, layers=4, heads=4))
    stream = batches(data, args.batch, args.seq, torch.Generator().manual_seed(0))  # same batches on all ranks
    inputs, targets = next(stream)

    pin = {axis: degree for axis, degree in (("pp", args.pp), ("tp", args.tp)) if degree}
    pm = autoplan.parallelize(model, inputs, mesh=pin)
    if is_rank0():
        print(pm.plan)
    opt = torch.optim.AdamW(pm.parameters(), lr=3e-3)
    start, tokens = time.perf_counter(), 0
    for step in range(args.steps):
        loss = pm.train_step(inputs, targets)
        opt.step()
        opt.zero_grad()
        tokens += inputs.numel()
        if is_rank0() and (step % 10 == 0 or step == args.steps - 1):
            rate = tokens / (time.perf_counter() - start)
            print(f"step {step:4d}  loss {loss:.3f}  {rate:,.0f} tokens/s")
        inputs, targets = next(stream)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
