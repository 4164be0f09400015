"""The executor: apply a :class:`autoplan.Plan` to a model with torch.distributed and train it.

One module per parallelism kind — :mod:`.mesh` (DeviceMesh), :mod:`.tensor_parallel` (DTensor styles),
:mod:`.split` and :mod:`.pipeline` (stages and schedules), :mod:`.recompute` (activation checkpointing),
:mod:`.data_parallel` (DDP / FSDP2) — driven by :mod:`.apply`; :mod:`.parallelize` is the entry point and
:mod:`.parallel_model` the object it returns. :mod:`.manual` writes plans by hand.

Example:
    >>> from autoplan.execute import parallelize, ParallelModel, manual_plan
    >>> callable(parallelize)
    True
"""

from .manual import manual_plan
from .parallel_model import ParallelModel
from .parallelize import parallelize

__all__ = ["parallelize", "ParallelModel", "manual_plan"]
