"""Cost model: pure functions from (layer figures, cluster, strategy choices) to seconds and bytes.

Every formula cites its source. Units are in the names (``_s``, ``_bytes``, ``_flops``, ``_Bps``).

- :mod:`~autoplan.cost.alpha_beta`: the alpha-beta times of one collective on one link.
- :mod:`~autoplan.cost.collectives`: the collectives' times per group placement, measured or alpha-beta.
- :mod:`~autoplan.cost.memory`: model states (ZeRO), autocast weight copies, loss buffers.
- :mod:`~autoplan.cost.layer`: one layer's compute, tensor-parallel communication and activation bytes.
- :mod:`~autoplan.cost.step`: pipeline schedule terms, data-parallel sync, the optimizer update.
- :mod:`~autoplan.cost.runtime`: the runtime's fixed costs per step (stage roots' data-parallel hooks, the
  pipeline runtime's schedule actions, the loss collectives).
- :mod:`~autoplan.cost.strategy`: a layout's discrete choices and the per-rank terms they fix (tail, model
  states, weight copy, loss buffers, sends, microbatches in flight).
- :mod:`~autoplan.cost.layer_choice`: one layer's cost under a layout's choices, and a plan's choice per layer.
- :mod:`~autoplan.cost.plan_cost`: a whole plan's step time and per-stage memory (``compose``), the cost the
  solver minimises.

Example:
    >>> from autoplan.cost import allreduce_s
    >>> round(allreduce_s(1e9, 8, bandwidth_Bps=100e9, latency_s=0.0), 4)   # 2·7/8·1 GB / 100 GB/s
    0.0175
"""

from . import collectives as _collectives
from . import contention as _contention
from . import layer as _layer
from . import memory as _memory
from . import runtime as _runtime
from . import step as _step
from .collectives import *  # noqa: F401,F403
from .contention import *  # noqa: F401,F403
from .layer import *  # noqa: F401,F403
from .memory import *  # noqa: F401,F403
from .step import *  # noqa: F401,F403
from .runtime import *  # noqa: F401,F403

__all__ = [name for m in (_collectives, _contention, _layer, _memory, _step, _runtime) for name in m.__all__ if name != "check_group"]
