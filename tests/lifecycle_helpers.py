"""Model-lifecycle test support: four global batches (a checkpoint is saved after the first two), one-process
references, and a launcher that collects every rank's results (the fail-together case shuts the process groups
down, so ranks write their own files)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distributed_helpers import GLOBAL_BATCH, GPT_CONFIG, build_model, torchrun, train_one_process

WORKER = Path(__file__).with_name("lifecycle_worker.py")


#: steps trained before a checkpoint is saved, then as many after it is loaded: two, so that the loaded AdamW
#: moments (built from two different gradients) and step count decide the next updates
SAVE_AT = 2


def lifecycle_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """2 × :data:`SAVE_AT` GPT global batches, the same on every rank and in the references."""
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(2 * SAVE_AT):
        tokens = torch.randint(0, GPT_CONFIG.vocab_size, (GLOBAL_BATCH, GPT_CONFIG.seq_len + 1), generator=g)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def train_reference(model: torch.nn.Module, batches) -> tuple[list[float], dict]:
    """AdamW steps of one process over whole global batches: (losses, final state dict)."""
    return train_one_process(model, batches)


def lifecycle_reference() -> tuple[list[float], dict]:
    """One process over every batch of :func:`lifecycle_batches`: (losses, final state dict)."""
    return train_reference(build_model("gpt"), lifecycle_batches())


def run_lifecycle_world(cases: list[dict], tmp_path: Path, nproc: int = 4, timeout_s: int = 240) -> list[dict]:
    """Run the cases in one torchrun world; returns each rank's {name: result}."""
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    torchrun(WORKER, [spec, tmp_path], nproc, timeout_s)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(nproc)]
