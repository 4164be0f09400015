"""autoplan.trace as users call it: input forms, errors, meta models, and the model left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoplan
from autoplan.models import GPT, MLP, GPTConfig


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x, y):
        return self.b(self.a(x) + y)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)

    def forward(self, x):
        x = self.first(x)
        if x.sum() > 0:
            x = self.second(x)
        return x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = DataDependent()

    def forward(self, x):
        return self.inner(x)


def test_inputs_as_tensor_tuple_list_and_dict_give_one_graph():
    model = TwoInputs()
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    graphs = [
        autoplan.trace(model, (x, y)),
        autoplan.trace(model, [x, y]),
        autoplan.trace(model, {"x": x, "y": y}),
    ]
    assert {g.forward_flops for g in graphs} == {2 * 2 * 3 * 8 * 8}
    assert {g.batch_size for g in graphs} == {3}
    single = autoplan.trace(nn.Linear(8, 2), torch.randn(5, 8))
    assert single.batch_size == 5 and single.forward_flops == 2 * 5 * 8 * 2


def test_missing_inputs_raise_value_error_with_the_way_out():
    with pytest.raises(ValueError, match="example inputs are needed"):
        autoplan.trace(MLP(), None)
    with pytest.raises(ValueError, match="batch"):
        autoplan.trace(TwoInputs(), (torch.randn(3, 8), torch.randn(4, 8)))
    with pytest.raises(ValueError, match="nn.Module"):
        autoplan.trace(lambda x: x, torch.randn(2, 2))


def test_data_dependent_control_flow_raises_trace_error_naming_module_and_line():
    with pytest.raises(autoplan.TraceError) as info:
        autoplan.trace(Outer(), torch.randn(2, 4))
    message = str(info.value)
    assert "'inner'" in message and "if x.sum() > 0" in message
    assert "leaf" in message and "example inputs" in message and "control flow" in message
    assert info.value.__cause__ is not None


def test_model_is_left_unchanged_and_without_hooks():
    model = GPT(GPTConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    training = model.training
    autoplan.trace(model, torch.randint(0, 256, (2, 16)))
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is tensors[k] and torch.equal(after[k], before[k]) for k in before)
    assert all(t.grad is None for t in model.parameters())
    assert model.training == training and model.head.weight is model.tok.weight
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    from torch.nn.modules import module as module_mod

    assert not module_mod._global_forward_hooks and not module_mod._global_forward_pre_hooks


def test_meta_model_traces_without_memory():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50304, seq_len=128, hidden=768, layers=4, heads=12))
    graph = autoplan.trace(model, torch.randint(0, 50304, (2, 128)))
    assert graph.method == "fx" and graph.num_params == sum(p.numel() for p in model.parameters())
    assert all(p.device.type == "meta" for p in model.parameters())


def test_export_route_when_fx_fails():
    class KeywordOnly(nn.Module):
        """fx cannot follow the `**kwargs` forward; export can."""

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 4)

        def forward(self, **inputs):
            return self.proj(inputs["x"])

    graph = autoplan.trace(KeywordOnly(), {"x": torch.randn(2, 8)})
    assert graph.method == "export"
    assert graph.forward_flops == 2 * 2 * 8 * 4
    assert [layer.name for layer in graph.layers] == ["proj"]


def test_wrong_example_inputs_raise_trace_error():
    with pytest.raises(autoplan.TraceError, match="example inputs"):
        autoplan.trace(MLP(16, 32, depth=1), torch.randn(4, 7))
