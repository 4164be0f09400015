"""Executor tests in one process: pipeline splitting, recompute, plan checks, and the world-of-one path."""

from __future__ import annotations

import copy

import pytest
import torch

import autoplan
from autoplan.execute.batch import default_loss, dp_slice, microbatches
from autoplan.execute.manual import manual_plan
from autoplan.execute.recompute import apply_recompute
from autoplan.trace.stages import split_into_stages
from autoplan.trace.fingerprint import model_fingerprint
from autoplan.execute.world import World
from autoplan.models import GPT, MLP, GPTConfig
from distributed_helpers import train_one_process

CFG = GPTConfig(vocab_size=64, seq_len=8, hidden=32, layers=3, heads=4)
GPT_LAYERS = ["tok", "pos", "blocks.0", "blocks.1", "blocks.2", "ln_f", "head"]


def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG)


def tokens(batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(0, CFG.vocab_size, (batch, CFG.seq_len + 1), generator=torch.Generator().manual_seed(1))
    return t[:, :-1], t[:, 1:]


def run_stages(parts, x):
    for part in parts:
        x = part(*x) if isinstance(x, tuple) else part(x)
    return x


# -- pipeline splitting -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cuts", [[3], [2, 5], [1, 2, 3, 4, 5, 6]])
def test_split_gpt_reproduces_forward(cuts):
    model = gpt()
    bounds = [0, *cuts, len(GPT_LAYERS)]
    stages = [GPT_LAYERS[a:b] for a, b in zip(bounds, bounds[1:])]
    parts = split_into_stages(model, stages)
    x, _ = tokens()
    assert torch.equal(run_stages(parts, x), model(x))
    held = [{n for n, _ in part.named_parameters(remove_duplicate=False)} for part in parts]
    assert "tok.weight" in held[0] and "head.weight" in held[-1]
    assert set().union(*held) == {n for n, _ in model.named_parameters(remove_duplicate=False)}


def test_split_passes_a_value_across_several_stages():
    model = gpt()
    # pos is first used after tok but its arange comes from the input tokens: stage 1 needs only tok's output.
    parts = split_into_stages(model, [["tok"], ["pos", "blocks.0"], ["blocks.1", "blocks.2", "ln_f", "head"]])
    x, _ = tokens()
    assert torch.equal(run_stages(parts, x), model(x))


def test_split_rejects_stages_out_of_forward_order():
    with pytest.raises(autoplan.TraceError, match="order"):
        split_into_stages(gpt(), [["tok", "pos", "blocks.1"], ["blocks.0", "blocks.2", "ln_f", "head"]])


def test_split_rejects_untraceable_forward():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.b(self.a(x)) if x.sum() > 0 else x

    with pytest.raises(autoplan.TraceError, match="pp': 1"):
        split_into_stages(Branchy(), [["a"], ["b"]])


# -- recompute ----------------------------------------------------------------------------------------------
def test_recompute_runs_forward_again_in_backward_with_same_gradients():
    class Counting(torch.nn.Linear):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return torch.tanh(super().forward(x))

    torch.manual_seed(0)
    model = torch.nn.Sequential(Counting(8, 8), torch.nn.Linear(8, 2))
    reference = copy.deepcopy(model)
    assert apply_recompute(model, ["0"]) == 1
    assert apply_recompute(model, ["0"]) == 0  # idempotent
    x = torch.randn(4, 8)
    Counting.calls = 0
    model(x).sum().backward()
    assert Counting.calls == 2  # forward, then again in backward
    Counting.calls = 0
    reference(x).sum().backward()
    assert Counting.calls == 1
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad), name
    assert list(model.state_dict()) == list(reference.state_dict())


# -- batches ------------------------------------------------------------------------------------------------
def test_slices_and_microbatches_cover_the_batch_in_order():
    x = torch.arange(16)
    parts = [mb[0] for r in range(2) for mb in microbatches(dp_slice((x,), 2, r), 4)]
    assert torch.equal(torch.cat(parts), x)


def test_default_loss_cross_entropy_for_integer_targets_and_mse_otherwise():
    logits, targets = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    assert torch.allclose(default_loss(logits, targets), torch.nn.functional.cross_entropy(logits.view(6, 5),
                                                                                            targets.view(6)))
    a, b = torch.randn(4, 2), torch.randn(4, 2)
    assert torch.allclose(default_loss(a, b), torch.nn.functional.mse_loss(a, b))


# -- plan checks: errors before anything changes ------------------------------------------------------------
def _untouched(model, before):
    after = model.state_dict()
    return all(torch.equal(before[k], after[k]) for k in before) and "forward" not in vars(model.blocks[0])


def test_plan_for_another_model_is_refused_with_both_fingerprints():
    other = GPT(GPTConfig(vocab_size=64, seq_len=8, hidden=32, layers=2, heads=4))
    plan = manual_plan(other, [["tok", "pos", "blocks.0", "blocks.1", "ln_f", "head"]], global_batch_size=8)
    model = gpt()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(autoplan.PlanMismatchError) as err:
        autoplan.parallelize(model, plan=plan)
    assert plan.model.fingerprint in str(err.value) and "re-plan" in str(err.value)
    assert _untouched(model, before)


def test_plan_for_another_world_size_is_refused_naming_both_sizes():
    model = gpt()
    plan = manual_plan(model, [GPT_LAYERS[:3], GPT_LAYERS[3:]], pp=2, global_batch_size=8, microbatches=2)
    with pytest.raises(autoplan.PlanMismatchError, match="needs 2 ranks but this job has 1"):
        autoplan.parallelize(model, plan=plan)


@pytest.mark.parametrize("change, message", [
    (dict(stages=(autoplan.Stage(("tok", "pos", "blocks.0", "blocks.9", "ln_f", "head")),)), "blocks.9"),
    (dict(stages=(autoplan.Stage(tuple(GPT_LAYERS), ("blocks.7",)),)), "recomputes module 'blocks.7'"),
])
def test_plan_naming_missing_modules_is_refused(change, message):
    model = gpt()
    plan = manual_plan(model, [GPT_LAYERS], global_batch_size=8).replace(**change)
    with pytest.raises(autoplan.PlanMismatchError, match=message):
        autoplan.parallelize(model, plan=plan)


def test_tensor_parallel_style_on_the_wrong_module_kind_is_refused():
    model = gpt()
    plan = manual_plan(model, [GPT_LAYERS], global_batch_size=8, tp=1)
    plan = plan.replace(mesh=autoplan.Mesh(tp=2), cluster=autoplan.Cluster.preset("cpu", devices_per_node=2),
                        tensor_parallel={"ln_f": "colwise", "head": "rowwise"})
    with pytest.raises(autoplan.PlanMismatchError, match="needs an nn.Linear but the module is LayerNorm"):
        from autoplan.execute.validate import check_plan_matches
        check_plan_matches(plan, model, world_size=2)


def test_tensor_parallel_degree_that_does_not_divide_the_features_is_refused():
    from autoplan.execute.validate import check_plan_matches

    model = gpt()
    plan = manual_plan(model, [GPT_LAYERS], global_batch_size=6, tp=3,
                       tensor_parallel={"blocks.0.mlp.fc": "colwise", "blocks.0.mlp.proj": "rowwise"})
    with pytest.raises(autoplan.PlanMismatchError, match="out_features=128 over tp=3"):
        check_plan_matches(plan, model, world_size=3)


def test_plan_with_planning_arguments_is_a_value_error():
    model = gpt()
    plan = manual_plan(model, [GPT_LAYERS], global_batch_size=8)
    with pytest.raises(ValueError, match="mesh"):
        autoplan.parallelize(model, plan=plan, mesh={"dp": 1})


# -- a world of one -----------------------------------------------------------------------------------------
def _parallel_losses(pm, steps, lr=1e-2):
    opt = torch.optim.AdamW(pm.parameters(), lr=lr)
    losses = []
    for inputs, targets in steps:
        losses.append(pm.train_step(inputs, targets))
        opt.step()
        opt.zero_grad()
    return losses


def test_world_of_one_with_microbatches_and_recompute_matches_plain_training(tmp_path):
    steps = [tokens(8) for _ in range(3)]
    reference = gpt()
    expected, _ = train_one_process(reference, steps, lr=1e-2)
    model = gpt()
    plan = manual_plan(model, [GPT_LAYERS], global_batch_size=8, microbatches=4, recompute=["blocks.0", "blocks.2"])
    plan.save(tmp_path / "plan.json")
    pm = autoplan.parallelize(model, plan=str(tmp_path / "plan.json"))
    assert World.current().size == 1 and not torch.distributed.is_initialized()
    losses = _parallel_losses(pm, steps)
    assert losses == pytest.approx(expected, rel=1e-5)
    state = pm.full_state_dict()
    assert list(state) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        # Attention's key bias has a true gradient of zero (softmax ignores a shift); AdamW scales the rounding
        # noise there up to ±lr per step, so the bound is a fraction of one step, not of float precision.
        assert torch.allclose(state[key], value, atol=1e-4), key
    x, y = steps[0]
    assert torch.allclose(pm(x), reference(x), atol=1e-5)
    assert pm.evaluate(x, y) == pytest.approx(default_loss(reference(x), y).item(), rel=1e-5)


def test_train_and_eval_modes_reach_the_modules():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    pm = autoplan.parallelize(model, plan=manual_plan(model, [[""]], global_batch_size=2))
    x = torch.ones(2, 4)
    assert not pm.eval().modules_on_rank[0][1].training
    assert torch.equal(pm(x), model[0](x))  # dropout off
    assert pm.train().modules_on_rank[0][1].training


def test_wrong_batch_size_names_the_plan_batch():
    model = gpt()
    pm = autoplan.parallelize(model, plan=manual_plan(model, [GPT_LAYERS], global_batch_size=8))
    x, y = tokens(4)
    with pytest.raises(ValueError, match="global_batch_size 8"):
        pm.train_step(x, y)


def test_automatic_plan_in_a_world_of_one_trains():
    model = gpt()
    x, y = tokens(8)
    pm = autoplan.parallelize(model, x, cluster=autoplan.Cluster.preset("cpu", devices_per_node=1))
    assert pm.plan.mesh.world_size == 1 and pm.plan.precision == "fp32"
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    first = pm.train_step(x, y)
    opt.step()
    opt.zero_grad()
    for _ in range(4):
        last = pm.train_step(x, y)
        opt.step()
        opt.zero_grad()
    assert last < first


def test_lazy_example_inputs_plan_at_the_first_step():
    model = MLP(8, 16, depth=2)
    pm = autoplan.parallelize(model, cluster=autoplan.Cluster.preset("cpu", devices_per_node=1))
    assert not pm.applied
    with pytest.raises(ValueError, match="first train_step"):
        pm.plan
    x, y = torch.randn(12, 8), torch.randn(12, 8)
    loss = pm.train_step(x, y)
    assert pm.applied and pm.plan.global_batch_size == 12 and loss > 0
    assert pm.plan.model.fingerprint == model_fingerprint(MLP(8, 16, depth=2))


def test_bf16_plan_trains_under_autocast_close_to_fp32():
    steps = [tokens(8) for _ in range(3)]
    expected, _ = train_one_process(gpt(), steps, lr=1e-2)
    model = gpt()
    pm = autoplan.parallelize(model, plan=manual_plan(model, [GPT_LAYERS], global_batch_size=8, precision="bf16"))
    losses = _parallel_losses(pm, steps)
    assert all(p.dtype == torch.float32 for p in pm.parameters())  # fp32 master weights
    assert pm(steps[0][0]).dtype == torch.bfloat16
    assert losses == pytest.approx(expected, rel=2e-2) and losses != pytest.approx(expected, rel=1e-6)


class _BranchesOnShape(torch.nn.Module):
    """Traces with torch.export but not with torch.fx (Python control flow on a traced value's truth)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        if h.shape[0] > 0 and bool(h.sum() != 0):
            h = torch.relu(h)
        return self.b(h)


class _ReusesALayer(_BranchesOnShape):
    """torch.fx cannot trace it (control flow on a shape) and its layer ``a`` runs twice: no stage can end after
    ``a``, so it is not split."""

    def forward(self, x):
        h = self.a(x)
        if h.shape[0] > 0:
            h = self.a(h)
        return self.b(h)


def test_automatic_plans_avoid_pipelines_the_executor_cannot_split():
    from autoplan.trace.stages import pipeline_split_blocker

    assert pipeline_split_blocker(gpt()) is None
    x = torch.randn(4, 8)
    assert "more than once" in pipeline_split_blocker(_ReusesALayer(), ["a", "b"], ((x,), {}))
    cluster = autoplan.Cluster.preset("cpu", devices_per_node=4)
    plan = autoplan.plan(_ReusesALayer(), x, cluster=cluster, precision="fp32")
    assert plan.mesh.pp == 1 and any("more than once" in note for note in plan.search.notes)
    with pytest.raises(ValueError, match="cannot be split into them.*more than once"):
        autoplan.plan(_ReusesALayer(), x, cluster=cluster, precision="fp32", mesh={"pp": 2})


# -- skeleton stages (models torch.fx cannot trace) ------------------------------------------------------------

def _hf(family: str):
    models_hf = pytest.importorskip("models_hf")
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, inputs = models_hf.FAMILIES[family]()
    for module in model.modules():  # dropout off: the chained stages and the whole model then agree exactly
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model, (inputs["input_ids"],)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("family, layers, cuts, carried", [
    # Llama: the cut before the first block carries the embedding (rotary tables are recomputed on every stage)
    ("llama", ["model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1", "model.norm", "lm_head"],
     [2, 3, 5], {2: [0], 3: [2], 5: [4]}),
    # GPT-2: the cut before the dropout carries token and position embeddings (summed between layers); the tied
    # embedding and head land in different stages
    ("gpt2", ["transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h.0", "transformer.h.1",
              "transformer.ln_f", "lm_head"], [2, 4], {2: [0, 1], 4: [3]}),
])
def test_skeleton_stages_of_transformers_models_train_like_the_whole_model(family, layers, cuts, carried):
    from autoplan.trace.skeleton import analyse_cuts, skeleton_stages, stands_in

    model, args = _hf(family)
    analysis = analyse_cuts(model, layers, args, {})
    assert analysis.blocker is None
    assert {c: analysis.carried(c) for c in cuts} == carried
    bounds = [0, *cuts, len(layers)]
    parts = skeleton_stages(model, [layers[a:b] for a, b in zip(bounds, bounds[1:])], analysis)
    expected = model(*args).logits
    expected.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    x = ()
    for part in parts:
        x = part(*x, model_inputs=(args, {}))
    logits = parts[-1].rebuild_output(x).logits
    assert torch.equal(logits, expected)
    logits.sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-6), name
    # each stage holds its layers' original modules under their FQNs, and nothing else with weights; the layers
    # it does not run are stand-ins, except parameter-free ones it recomputes (Llama's rotary tables)
    held = [{n for n, _ in part.named_parameters()} for part in parts]
    for k, part in enumerate(parts):
        own = layers[bounds[k]:bounds[k + 1]]
        assert all(any(n.startswith(l + ".") for l in own) for n in held[k]), (k, held[k])
        for i, layer in enumerate(layers):
            module = part.get_submodule(layer)
            if layer in own:
                assert module is model.get_submodule(layer)
            else:
                assert stands_in(module) or (i < bounds[k] and i in analysis.replicated), (k, layer)
    if family == "gpt2":  # the tied weight is held by the first and the last stage
        assert "transformer.wte.weight" in held[0] and "lm_head.weight" in held[-1]


class _Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(self.a(x)))


class _SideChannel(torch.nn.Module):
    """Layer ``b`` reads a tensor ``a`` left on itself, not ``a``'s output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.a(x)
        return self.b(y) + self.a.weight.sum()


@pytest.mark.parametrize("model, reason", [(_Twice(), "more than once"), (_SideChannel(), "made inside \\['a'\\]")])
def test_skeleton_split_refuses_unsound_models_with_the_reason(model, reason):
    # torch.fx traces these, so the skeleton analysis is asked directly (what a model fx cannot trace gets)
    from autoplan.trace.skeleton import analyse_cuts

    assert analyse_cuts(model, ["a", "b"], (torch.randn(2, 4),), {}).blocker is not None
    assert reason.replace("\\", "") in analyse_cuts(model, ["a", "b"], (torch.randn(2, 4),), {}).blocker


class CachingMLP(torch.nn.Module):
    """A forward that takes ``use_cache`` (as transformers' causal LMs do) and records what it was given."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.seen: list = []

    def forward(self, x, use_cache=True):
        self.seen.append(use_cache)
        return self.fc(x)


def test_steps_run_without_a_generation_cache_as_the_plan_was_traced():
    """The trace passes use_cache=False (a generation cache is no training output); a training or evaluation step
    does too, so that what runs is what was priced, unless the caller set it."""
    model = CachingMLP()
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    pm = autoplan.parallelize(model, plan=manual_plan(model, [["fc"]], global_batch_size=2))
    pm.train_step(x, y)
    pm.evaluate(x, y)
    pm.train_step({"x": x, "use_cache": True}, y)
    pm(x)  # a plain call is the caller's forward: left as given
    assert model.seen == [False, False, True, True]
