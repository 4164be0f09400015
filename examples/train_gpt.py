"""Train a small GPT on a text corpus with an automatic plan, on 4 CPU ranks.

    torchrun --standalone --nproc_per_node 4 examples/train_gpt.py
    torchrun --standalone --nproc_per_node 4 examples/train_gpt.py --steps 100 --pp 2   # pin part of the mesh
    torchrun --standalone --nproc_per_node 4 examples/train_gpt.py --steps 30 --save ckpt
    torchrun --standalone --nproc_per_node 2 examples/train_gpt.py --steps 30 --resume ckpt --tp 2

Tokens are the corpus bytes (examples/data/corpus.txt, vocabulary 256). Rank 0 plans for this job
(``Cluster.detect()``), every rank applies the plan; the script prints the plan, the loss as it falls and the
training throughput in tokens/s.

``--save DIR`` writes a distributed checkpoint (model, AdamW state, step, data position) at the end;
``--resume DIR`` builds the model on meta (nothing allocated until each rank holds its part), loads the checkpoint
and trains ``--steps`` more — under whatever plan this job gets, on any number of ranks.
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
    parser.add_argument("--save", default=None, help="write a checkpoint to this folder at the end")
    parser.add_argument("--resume", default=None, help="resume from a checkpoint folder written by --save")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data = torch.tensor(list(CORPUS.read_bytes()), dtype=torch.long)
    config = GPTConfig(vocab_size=256, seq_len=args.seq, hidden=64, layers=4, heads=4)
    torch.manual_seed(0)  # the same initial weights on every rank
    # Resuming: build on meta; the checkpoint fills each rank's shards (init_weights=False skips initializing).
    with torch.device("meta") if args.resume else torch.device("cpu"):
        model = GPT(config)
    generator = torch.Generator().manual_seed(0)
    stream = batches(data, args.batch, args.seq, generator)  # the same batches on every rank
    inputs, targets = next(stream)

    pin = {axis: degree for axis, degree in (("pp", args.pp), ("tp", args.tp)) if degree}
    pm = autoplan.parallelize(model, inputs, mesh=pin, init_weights=False if args.resume else None)
    if is_rank0():
        print(pm.plan)
    opt = torch.optim.AdamW(pm.parameters(), lr=3e-3)
    first = 0
    if args.resume:
        extra = pm.load_checkpoint(args.resume, optimizer=opt)
        first = extra["step"]
        generator.set_state(extra["data"])
        inputs, targets = next(stream)
        if is_rank0():
            print(f"resumed from {args.resume} at step {first}")
    start, tokens = time.perf_counter(), 0
    for step in range(first, first + args.steps):
        loss = pm.train_step(inputs, targets)
        opt.step()
        opt.zero_grad()
        tokens += inputs.numel()
        if is_rank0() and (step % 10 == 0 or step == first + args.steps - 1):
            rate = tokens / (time.perf_counter() - start)
            print(f"step {step:4d}  loss {loss:.3f}  {rate:,.0f} tokens/s")
        data_state = generator.get_state()  # the position before the next batch is drawn
        inputs, targets = next(stream)
    if args.save:
        pm.save_checkpoint(args.save, optimizer=opt, extra={"step": first + args.steps, "data": data_state})
        if is_rank0():
            print(f"saved a checkpoint of step {first + args.steps} to {args.save}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
