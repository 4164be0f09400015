"""Inputs a new user gets wrong get autoplan errors that say what was expected, and nothing is half-applied;
keyword inputs work in train_step and pm(...) as in plan(); the batch-size error names the rule and the nearest
sizes that work; a TraceError points at the user's line and export's graph dumps stay off stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoplan
from autoplan.execute.manual import manual_plan
from autoplan.models import GPT, GPTConfig

import inputs_worker
from inputs_worker import BATCH, SEQ, KeywordModel

CONFIG = GPTConfig(vocab_size=32, seq_len=8, hidden=16, layers=1, heads=2)
GPT_LAYERS = ["tok", "pos", "blocks.0", "ln_f", "head"]


def _gpt_pm(**kwargs):
    torch.manual_seed(0)
    model = GPT(CONFIG)
    return autoplan.parallelize(model, plan=manual_plan(model, [GPT_LAYERS], global_batch_size=4, microbatches=2),
                                **kwargs)


def _tokens():
    tokens = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.seq_len + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def _no_grads(pm) -> bool:
    return all(p.grad is None for p in pm.parameters())


# -- wrong inputs to train_step -----------------------------------------------------------------------------------

def test_targets_none_says_targets_are_needed():
    pm = _gpt_pm()
    x, _ = _tokens()
    with pytest.raises(ValueError, match=r"train_step/evaluate\(inputs, targets\) needs targets: a tensor whose dim 0 "
                                         r"is the batch \(4 samples\)"):
        pm.train_step(x, None)
    with pytest.raises(ValueError, match="targets must be a tensor whose dim 0 is the batch, got a list"):
        pm.evaluate(x, [1, 2, 3, 4])
    assert _no_grads(pm)


def test_inputs_and_targets_that_do_not_line_up():
    pm = _gpt_pm()
    x, y = _tokens()
    with pytest.raises(ValueError, match=r"targets have 3 samples \(dim 0\) but inputs have 4"):
        pm.train_step(x, y[:3])
    with pytest.raises(ValueError, match=r"dim 0 of every input is the batch, but they differ: \{0: 4, 1: 2\}"):
        pm.train_step((x, x[:2]), y)
    with pytest.raises(ValueError, match="input 'mask' is a 0-dim tensor"):
        pm.train_step({"idx": x, "mask": torch.tensor(1.0)}, y)
    assert _no_grads(pm)


def test_float_token_ids_name_the_embedding():
    pm = _gpt_pm()
    x, y = _tokens()
    with pytest.raises(ValueError, match=r"embedding 'tok' got a float32 tensor of shape \(2, 8\) as indices; "
                                         r"token ids must be an integer tensor"):
        pm.train_step(x.float(), y)
    with pytest.raises(ValueError, match="embedding 'tok'"):
        pm(x.float())
    assert _no_grads(pm)


def test_float_targets_for_a_classification_loss():
    pm = _gpt_pm()
    x, y = _tokens()
    # the default loss: float targets mean MSE, which needs the outputs' shape (never a broadcast loss)
    with pytest.raises(ValueError, match=r"targets are a float32 tensor of shape \(2, 8\) but outputs are a float32 "
                                         r"tensor of shape \(2, 8, 32\).*pass integer class ids \(targets.long\(\)\)"):
        pm.train_step(x, y.float())
    assert _no_grads(pm)
    # the user's own cross-entropy: torch's error comes back with the shapes and the fix
    pm = _gpt_pm(loss_fn=lambda out, t: F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1)))
    with pytest.raises(ValueError, match=r"loss_fn\(outputs, targets\) failed on outputs a float32 tensor of shape "
                                         r"\(2, 8, 32\) and targets a float32 tensor of shape \(2, 8\): .* "
                                         r"needs integer class ids: pass targets.long\(\)") as info:
        pm.train_step(x, y.float())
    assert isinstance(info.value.__cause__, RuntimeError)
    assert _no_grads(pm)
    assert pm.train_step(x, y) > 0  # the same model trains once the targets are right


def test_a_loss_that_is_not_a_scalar():
    pm = _gpt_pm(loss_fn=lambda out, t: F.cross_entropy(out.transpose(1, 2), t, reduction="none"))
    x, y = _tokens()
    with pytest.raises(ValueError, match=r"loss_fn must return the mean loss over its microbatch as a scalar tensor, "
                                         r"got a float32 tensor of shape \(2, 8\); use reduction='mean'"):
        pm.train_step(x, y)
    assert _no_grads(pm)


def test_integer_targets_of_the_wrong_shape_for_the_default_loss():
    pm = _gpt_pm()
    x, y = _tokens()
    with pytest.raises(ValueError, match="the default loss is cross-entropy for integer targets"):
        pm.train_step(x, y[:, :4])


# -- keyword inputs -----------------------------------------------------------------------------------------------

def _check_against_reference(result: dict, rel_loss=1e-5, rel_weight=1e-4):
    ref = inputs_worker.reference()
    assert result["losses"] == pytest.approx(ref["losses"], rel=rel_loss)
    for name, value in ref["state"].items():
        torch.testing.assert_close(result["state"][name], value, rtol=rel_weight, atol=rel_weight)


def test_keyword_inputs_in_train_step_and_calls_world_of_one():
    model = inputs_worker.build()
    plan = manual_plan(model, [["emb", "fc1", "fc2", "head"]], global_batch_size=BATCH, microbatches=2)
    pm = autoplan.parallelize(model, plan=plan)
    _check_against_reference(inputs_worker.train(pm))
    inputs, _ = inputs_worker.batches()[0]
    reference = inputs_worker.reference()
    expected = KeywordModel()
    expected.load_state_dict(reference["state"])
    with torch.no_grad():
        want = expected(**inputs)
        torch.testing.assert_close(pm(inputs), want)          # one dict, the form plan() takes
        torch.testing.assert_close(pm(**inputs), want)        # keywords
        torch.testing.assert_close(pm(inputs["input_ids"], inputs["weights"]), want)  # positional


def test_keyword_inputs_plan_at_the_first_step():
    """parallelize(model) with no example inputs plans from the first train_step's dict, as plan() would."""
    pm = autoplan.parallelize(inputs_worker.build(), cluster=autoplan.Cluster.preset("cpu", devices_per_node=1))
    result = inputs_worker.train(pm)
    assert pm.plan.global_batch_size == BATCH
    _check_against_reference(result)
    with pytest.raises(ValueError, match="keyword inputs need string keys"):
        pm({0: torch.zeros(BATCH, SEQ, dtype=torch.long)})
    lazy = autoplan.parallelize(inputs_worker.build(), cluster=autoplan.Cluster.preset("cpu", devices_per_node=1))
    inputs, _ = inputs_worker.batches()[0]
    with pytest.raises(ValueError, match="planning takes positional or keyword example inputs, not both"):
        lazy(inputs["input_ids"], weights=inputs["weights"])
    assert not lazy.applied


@pytest.mark.slow
def test_keyword_inputs_on_two_ranks_dp_and_pp(tmp_path):
    out = tmp_path / "results.pt"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(Path(inputs_worker.__file__)), str(out)], env=env, capture_output=True, text=True,
                          timeout=180, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = torch.load(out, weights_only=False)
    for name in ("dp2", "pp2"):
        _check_against_reference(results[name])


# -- global batch that does not divide -----------------------------------------------------------------------------

def test_a_global_batch_that_does_not_divide_names_the_rule_and_the_nearest_sizes():
    torch.manual_seed(0)
    model = GPT(CONFIG)
    x = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.seq_len))
    cluster = autoplan.Cluster.preset("cpu", devices_per_node=4)
    with pytest.raises(ValueError, match=r"global batch 10 cannot be split over 4 devices with the pins "
                                         r"\{'mesh': \{'dp': 4\}\}: every layout needs global batch = dp × "
                                         r"microbatch_size × microbatches .* 10 is not a multiple of dp = 4\. "
                                         r"Nearest global batch sizes that work: 8 and 12"):
        autoplan.plan(model, x, cluster=cluster, global_batch_size=10, mesh={"dp": 4}, precision="fp32")
    with pytest.raises(ValueError, match=r"batch / dp = 6 is not a multiple of microbatch_size = 4.* Nearest global "
                                         r"batch sizes that work: 8 and 16"):
        autoplan.plan(model, x, cluster=cluster, global_batch_size=12, mesh={"dp": 2, "tp": 1},
                      microbatch_size=4, precision="fp32")
    with pytest.raises(ValueError, match=r"pp4×dp1×tp1: 2 microbatches, but 1f1b needs at least pp = 4.* Nearest "
                                         r"global batch size that works: 4"):
        autoplan.plan(GPT(GPTConfig(vocab_size=32, seq_len=8, hidden=16, layers=4, heads=2)), x, cluster=cluster,
                      global_batch_size=2, mesh={"pp": 4}, schedule="1f1b", precision="fp32")


# -- tracing errors -----------------------------------------------------------------------------------------------

class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:  # data-dependent control flow: neither fx nor export can follow it
            return h * 2
        return h


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)  # the example inputs have 4 features: the matmul fails inside nn.Linear

    def forward(self, x):
        return self.fc(x)


class _Wrong(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Block()

    def forward(self, x):
        return self.block(x)


def _line_of(function, text: str) -> int:
    lines, first = __import__("inspect").getsourcelines(function)
    return first + next(i for i, line in enumerate(lines) if text in line)


@pytest.mark.parametrize("model, where", [
    (_DataDependent(), ("'_DataDependent'", _DataDependent.forward, "if h.sum() > 0:")),
    (_Wrong(), ("'block'", _Block.forward, "return self.fc(x)")),  # not torch's linear.py
])
def test_trace_error_points_at_the_users_line_and_torch_stays_quiet(model, where, capfd):
    module, function, text = where
    with pytest.raises(autoplan.TraceError) as info:
        autoplan.trace(model, torch.randn(2, 4))
    message = str(info.value)
    assert f"in module {module} at {__file__}:{_line_of(function, text)} (`{text}" in message, message
    assert "site-packages/torch" not in message and ".." not in message
    err = capfd.readouterr().err
    # no graph dump of export's, no fake-tensor error log: the TraceError says it all
    assert "def forward" not in err and "fake_tensor" not in err and len(err) < 300, err[-3000:]
