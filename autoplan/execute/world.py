"""This process's place in the job: rank, world size, device, and the default process group.

Under torchrun (``WORLD_SIZE`` set) the default process group is initialised on first use (gloo for CPU plans,
nccl for CUDA plans). Outside torchrun the world is one process and no process group is created, so a second
``parallelize`` call in the same process starts from a clean slate.

Example:
    >>> from autoplan.execute.world import World
    >>> World.current().size >= 1
    True
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["World"]


@dataclass(frozen=True)
class World:
    """The job as this process sees it."""

    rank: int
    size: int
    local_rank: int

    @staticmethod
    def current() -> "World":
        """Read the job from an initialised process group, else from torchrun's environment, else a world of one.

        Example:
            >>> World.current().rank >= 0
            True
        """
        if dist.is_available() and dist.is_initialized():
            return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        size = int(os.environ.get("WORLD_SIZE", "1"))
        return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, kind: str) -> torch.device:
        """The torch device this rank computes on for a plan made for ``kind`` ("cpu" or "cuda").

        Example:
            >>> World(0, 1, 0).device("cpu")
            device(type='cpu')
        """
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(
                    "the plan is for CUDA devices but torch.cuda is not available here; plan for this machine "
                    "with cluster=autoplan.Cluster.detect() (or Cluster.preset('cpu', ...))"
                )
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        if kind != "cpu":
            raise ValueError(f"unknown device kind {kind!r}; plans name 'cuda' or 'cpu'")
        return torch.device("cpu")

    def init_process_group(self, kind: str, timeout_s: float | None = None) -> None:
        """Create the default process group once (gloo on CPU, nccl on CUDA) when the world has several ranks.
        ``timeout_s``: how long a collective waits for a stalled rank before raising (torch's default: 30 min for
        gloo, 10 min for nccl); it applies only when this call creates the group.

        Example:
            >>> World(0, 1, 0).init_process_group("cpu", timeout_s=60)  # a world of one needs none
        """
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout_s!r}")
        if not self.distributed or dist.is_initialized():
            return
        backend = "nccl" if kind == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
        dist.init_process_group(backend=backend, timeout=timeout)
