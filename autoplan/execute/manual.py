"""Plans written by hand: a layout you already know, as a :class:`autoplan.Plan` the executor applies as is.

Example:
    >>> from autoplan.models import MLP
    >>> from autoplan.execute.manual import manual_plan
    >>> model = MLP(16, 32, depth=2)
    >>> plan = manual_plan(model, [["layers.0", "layers.1"], ["layers.2", "layers.3", "layers.4"]],
    ...                    pp=2, global_batch_size=8, microbatches=4)
    >>> plan.mesh.world_size, plan.microbatch_size
    (2, 2)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..cluster import Cluster
from ..names import in_module
from ..trace.fingerprint import model_fingerprint
from ..plan import Mesh, ModelInfo, Plan, SearchInfo, Stage

__all__ = ["manual_plan"]


def manual_plan(
    model: nn.Module,
    stages: Sequence[Sequence[str]],
    *,
    pp: int = 1,
    dp: int = 1,
    tp: int = 1,
    global_batch_size: int,
    microbatches: int = 1,
    schedule: str = "1f1b",
    data_parallel: str = "ddp",
    tensor_parallel: dict[str, str] | None = None,
    recompute: Sequence[str] = (),
    precision: str = "fp32",
    cluster: Cluster | None = None,
    sequence_parallel: bool = False,
) -> Plan:
    """A validated plan for ``model`` with the given layout. ``stages`` lists each stage's layer FQNs in model order
    (``pp × virtual_stages`` of them; more than ``pp`` means interleaved). ``recompute`` names modules to
    recompute; each goes to the stage that holds it. ``cluster`` defaults to ``pp·dp·tp`` CPU ranks on one node.

    Example:
        >>> import torch
        >>> manual_plan(torch.nn.Linear(2, 2), [[""]], global_batch_size=4).mesh.world_size
        1
    """
    world = pp * dp * tp
    if cluster is None:
        cluster = Cluster.preset("cpu", devices_per_node=world)
    local_batch, rest = divmod(global_batch_size, dp * microbatches)
    if rest or local_batch < 1:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of dp × microbatches = "
            f"{dp}×{microbatches} = {dp * microbatches}"
        )
    per_stage: list[list[str]] = [[] for _ in stages]
    for fqn in recompute:
        owner = [k for k, layers in enumerate(stages) for layer in layers if in_module(fqn, layer)]
        if not owner:
            raise ValueError(f"recompute module {fqn!r} is not inside any stage's layers")
        per_stage[owner[0]].append(fqn)
    num_params = sum(p.numel() for p in model.parameters())
    return Plan(
        model=ModelInfo(type(model).__name__, model_fingerprint(model), num_params),
        cluster=cluster,
        global_batch_size=global_batch_size,
        microbatch_size=local_batch,
        microbatches=microbatches,
        mesh=Mesh(pp=pp, dp=dp, tp=tp),
        schedule=schedule,
        data_parallel=data_parallel,
        stages=tuple(Stage(tuple(layers), tuple(rc)) for layers, rc in zip(stages, per_stage)),
        tensor_parallel=dict(tensor_parallel or {}),
        precision=precision,
        virtual_stages=len(stages) // pp,
        sequence_parallel=sequence_parallel,
        search=SearchInfo(solver="manual", status="PINNED"),
    )
