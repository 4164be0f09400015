"""A fused projection with a bias (``colwise:K``) and FSDP: tensor parallelism splits the bias part by part on its
only dim, so FSDP could not shard it. The planner never pairs them, and a plan that does is refused before
anything is applied."""

from __future__ import annotations

import pytest
import torch

import autoplan
from autoplan.execute.validate import check_plan_matches


class GatedMLP(torch.nn.Module):
    def __init__(self, hidden: int = 8, inner: int = 16):
        super().__init__()
        self.up = torch.nn.Linear(hidden, 2 * inner)  # gate and up fused, with a bias
        self.down = torch.nn.Linear(inner, hidden)

    def forward(self, x):
        gate, up = self.up(x).chunk(2, dim=-1)
        return x + self.down(torch.nn.functional.silu(gate) * up)


def _plan(data_parallel: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), GatedMLP(), GatedMLP())
    cluster = autoplan.Cluster.preset("a100-80gb", devices_per_node=4)
    return model, autoplan.plan(model, torch.randn(8, 4, 8), cluster=cluster, global_batch_size=8,
                                mesh={"pp": 1, "dp": 2, "tp": 2}, data_parallel=data_parallel, precision="fp32")


def test_fsdp_plans_keep_fused_biased_projections_whole_and_say_why():
    _, ddp = _plan("ddp")
    assert ddp.tensor_parallel["1.up"] == ddp.tensor_parallel["2.up"] == "colwise:2"
    assert ddp.tensor_parallel["1.down"] == "rowwise"
    model, fsdp = _plan("fsdp")
    assert fsdp.tensor_parallel == {}
    assert any("fused projection with a bias" in note and "data_parallel='ddp'" in note for note in fsdp.search.notes)
    with pytest.raises(autoplan.PlanMismatchError, match="'1.up'.* no dim to shard it on; plan with data_parallel='ddp'"):
        check_plan_matches(ddp.replace(data_parallel="fsdp"), model, world_size=4)
    check_plan_matches(ddp, model, world_size=4)
