"""autoplan: plan and apply data / tensor / pipeline parallelism for unmodified PyTorch models.

Example:
    >>> import torch, autoplan
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> graph = autoplan.trace(model, (torch.randn(2, 8),))
    >>> graph.num_params
    212
"""

from .api import parallelize, plan
from .cluster import Cluster, Device
from .execute.state_dict import load_safetensors, save_safetensors
from .errors import AutoplanError, InfeasiblePlanError, PlanMismatchError, TraceError
from .graph import Layer, ModelGraph
from .plan import Mesh, Plan, Stage
from .trace import trace

__version__ = "0.1.0"

__all__ = [
    "AutoplanError",
    "Cluster",
    "Device",
    "InfeasiblePlanError",
    "Layer",
    "Mesh",
    "ModelGraph",
    "Plan",
    "PlanMismatchError",
    "Stage",
    "TraceError",
    "load_safetensors",
    "parallelize",
    "plan",
    "save_safetensors",
    "trace",
    "__version__",
]
