"""The executor: apply a :class:`autoplan.Plan` to a model with torch.distributed and train it.

One module per parallelism kind — :mod:`.mesh` (DeviceMesh), :mod:`.tensor_parallel` (DTensor styles),
:mod:`.split` and :mod:`.pipeline` (stages and schedules), :mod:`.recompute` (activation checkpointing),
:mod:`.data_parallel` (DDP / FSDP2) — driven by :mod:`.apply`; :mod:`.parallelize` is the entry point and
:mod:`.parallel_model` the object it returns. :mod:`.manual` writes plans by hand. Around them: :mod:`.materialize`
(models built on meta: allocate and initialize each rank's part), :mod:`.state_dict` (full and safetensors
weights in and out), :mod:`.checkpoint` (distributed checkpoints with DCP) and :mod:`.guards` (errors instead of
hangs and silent mistakes).

Example (one process, one stage: the executor's path at world size 1):
    >>> import torch
    >>> from autoplan.models import MLP
    >>> from autoplan.execute import parallelize, manual_plan
    >>> model = MLP(8, 16, depth=2)
    >>> pm = parallelize(model, plan=manual_plan(model, [["layers"]], global_batch_size=4))
    >>> opt = torch.optim.SGD(pm.parameters(), lr=0.1)
    >>> x, y = torch.randn(4, 8), torch.randn(4, 8)
    >>> losses = []
    >>> for _ in range(5):
    ...     losses.append(pm.train_step(x, y)); opt.step(); opt.zero_grad()
    >>> losses[-1] < losses[0]
    True
"""

from .manual import manual_plan
from .parallel_model import ParallelModel
from .parallelize import parallelize

__all__ = ["parallelize", "ParallelModel", "manual_plan"]
