"""Train a Hugging Face causal LM built from its config with an automatic plan (pipelines allowed), on CPU ranks.

    torchrun --standalone --nproc_per_node 4 examples/train_hf.py
    torchrun --standalone --nproc_per_node 4 examples/train_hf.py --family qwen2 --steps 40 --tp 2

The model is a small Llama (or Qwen2 / Mistral) from its transformers config with every default left as is
(``use_cache=True`` included: tracing handles the cache by itself). Tokens are the corpus bytes
(examples/data/corpus.txt, vocabulary 256). Rank 0 plans for this job (``Cluster.detect()``) with every mesh axis
free — pipeline parallelism included (transformers models are split into skeleton stages, see
docs/transformers.md) — and every rank applies the plan. ``--pp 2`` pins two pipeline stages. The script prints
the plan, its notes and the loss.
"""

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import autoplan

CORPUS = Path(__file__).with_name("data") / "corpus.txt"
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM")}


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def build(family: str, seq: int) -> torch.nn.Module:
    import transformers

    config_name, model_name = FAMILIES[family]
    config = getattr(transformers, config_name)(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=seq)
    return getattr(transformers, model_name)(config)


def lm_loss(outputs, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on a transformers ModelOutput's logits."""
    logits = outputs.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--tp", type=int, default=None, help="pin the tensor-parallel degree")
    parser.add_argument("--pp", type=int, default=None, help="pin the pipeline degree")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data = torch.tensor(list(CORPUS.read_bytes()), dtype=torch.long)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = build(args.family, args.seq)
    generator = torch.Generator().manual_seed(0)  # the same batches on every rank

    def batch():
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=generator)
        window = torch.stack([data[s:s + args.seq + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]

    inputs, targets = batch()
    pin = {axis: degree for axis, degree in (("pp", args.pp), ("tp", args.tp)) if degree}
    pm = autoplan.parallelize(model, (inputs,), loss_fn=lm_loss, mesh=pin)
    if is_rank0():
        print(pm.plan)
        for note in pm.plan.search.notes:
            print("note:", note)
        print(f"tensor parallel: {len(pm.plan.tensor_parallel)} modules sharded")
    opt = torch.optim.AdamW(pm.parameters(), lr=3e-3)
    start, tokens = time.perf_counter(), 0
    for step in range(args.steps):
        loss = pm.train_step(inputs, targets)
        opt.step()
        opt.zero_grad()
        tokens += inputs.numel()
        if is_rank0() and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss:.4f}  {tokens / (time.perf_counter() - start):,.0f} tokens/s")
        inputs, targets = batch()


if __name__ == "__main__":
    main()
