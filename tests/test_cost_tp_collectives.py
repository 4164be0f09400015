"""The tensor-parallel collectives layer_cost charges are the ones DTensor issues for the executor's styles.

A fake process group (one process standing for a world of 2) lets DTensor run its real code path while
CommDebugMode counts the collectives of forward and backward.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("torch.distributed.tensor.parallel", reason="needs DTensor tensor parallelism")
fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg", reason="needs torch's fake pg")

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Replicate  # noqa: E402
from torch.distributed.tensor.debug import CommDebugMode  # noqa: E402
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module  # noqa: E402


@pytest.fixture(scope="module")
def mesh():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=2)
    try:
        yield init_device_mesh("cpu", (2,))
    finally:
        dist.destroy_process_group()


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 32)
        self.proj = nn.Linear(32, 8)

    def forward(self, x):
        return self.proj(torch.relu(self.fc(x)))


def collectives(mesh, model, plan, x):
    parallelize_module(model, mesh, plan)
    with CommDebugMode() as forward:
        out = model(x)
    with CommDebugMode() as backward:
        out.sum().backward()
    name = lambda op: str(op).split(".")[-1]  # noqa: E731
    return ({name(k): v for k, v in forward.get_comm_counts().items()},
            {name(k): v for k, v in backward.get_comm_counts().items()})


def test_colwise_rowwise_pair_allreduces_once_each_way(mesh):
    x = torch.randn(2, 4, 8, requires_grad=True)
    plan = {"fc": ColwiseParallel(), "proj": RowwiseParallel()}
    assert collectives(mesh, FeedForward(), plan, x) == ({"all_reduce": 1}, {"all_reduce": 1})


def test_vocab_head_gathers_logits_forward_and_allreduces_input_gradient_backward(mesh):
    x = torch.randn(2, 4, 8, requires_grad=True)
    head = nn.Sequential(nn.Linear(8, 16, bias=False))
    plan = {"0": ColwiseParallel(output_layouts=Replicate())}
    assert collectives(mesh, head, plan, x) == ({"all_gather_into_tensor": 1}, {"all_reduce": 1})


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_vocab_embedding_allreduces_forward_only(mesh):
    tokens = torch.randint(0, 16, (2, 4))
    embedding = nn.Sequential(nn.Embedding(16, 8))
    plan = {"0": RowwiseParallel(input_layouts=Replicate())}
    assert collectives(mesh, embedding, plan, tokens) == ({"all_reduce": 1}, {})
