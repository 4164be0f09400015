"""One rank of the nanoGPT tensor-parallel world: ``autoplan.parallelize`` with a pinned tp2 mesh (rank 0 plans),
three AdamW steps; rank 0 saves the plan's styles, the losses and the full state dict."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import autoplan
import nanogpt
from distributed_helpers import train_parallel

LR = 1e-3


def main(out: str) -> None:
    torch.set_num_threads(1)
    model = nanogpt.build()
    data = nanogpt.batches()
    pm = autoplan.parallelize(model, data[0][0], loss_fn=nanogpt.loss_fn, mesh={"tp": 2},
                              cluster=autoplan.Cluster.preset("cpu", devices_per_node=2), data_parallel="ddp")
    _, losses, state = train_parallel(pm, data, LR)
    if dist.get_rank() == 0:
        torch.save({"styles": pm.plan.tensor_parallel, "losses": losses, "state": state,
                    "notes": list(pm.plan.search.notes)}, out)
    # gloo's threads are joined here, not torn down at interpreter exit (which once aborted a rank)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
