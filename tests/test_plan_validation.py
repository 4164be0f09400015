"""Plan JSON as a user edits it: each wrong field is named with the type expected, nothing is coerced, unknown keys
are reported, and a tensor-parallel colwise without its rowwise partner is refused before anything is applied."""

from __future__ import annotations

import json

import pytest
import torch

import autoplan
from autoplan.models import GPT, GPTConfig
from autoplan.plan import Plan

from test_plan_json import golden_plan


def _edit(change) -> dict:
    data = golden_plan().to_dict()
    change(data)
    return data


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(global_batch_size="abc"), "field 'global_batch_size' must be an integer, got str 'abc'"),
    (lambda d: d.update(global_batch_size=None), "field 'global_batch_size' must be an integer, got null"),
    (lambda d: d.update(global_batch_size=64.0), "field 'global_batch_size' must be an integer, got float 64.0"),
    (lambda d: d.update(microbatches=True), "field 'microbatches' must be an integer, got bool True"),
    (lambda d: d.update(stages={"layers": ["tok"]}), "field 'stages' must be a list, got dict"),
    (lambda d: d["stages"][1].pop("layers"), "field 'stages\\[1\\].layers' is missing"),
    (lambda d: d["stages"][0].update(layers="tok"), "field 'stages\\[0\\].layers' must be a list, got str 'tok'"),
    (lambda d: d["stages"][0].update(layers=["tok", 3]), "field 'stages\\[0\\].layers\\[1\\]' must be a string"),
    (lambda d: d["stages"].__setitem__(0, "tok"), "field 'stages\\[0\\]' must be an object, got str"),
    (lambda d: d["mesh"].update(tp="2"), "field 'mesh.tp' must be an integer, got str '2'"),
    (lambda d: d["mesh"].update(tp=2.0), "field 'mesh.tp' must be an integer, got float 2.0"),
    (lambda d: d.update(schedule=1), "field 'schedule' must be a string, got int 1"),
    (lambda d: d.update(tensor_parallel=["colwise"]), "field 'tensor_parallel' must be an object, got list"),
    (lambda d: d["tensor_parallel"].update({"head": 1}), "field \"tensor_parallel\\['head'\\]\" must be a string"),
    (lambda d: d["model"].update(num_params="151M"), "field 'model.num_params' must be an integer, got str"),
    (lambda d: d["predicted"].update(step_time_s="fast"), "field 'predicted.step_time_s' must be a number"),
    (lambda d: d["predicted"].update(peak_memory_bytes=[1.5, 2]),
     "field 'predicted.peak_memory_bytes\\[0\\]' must be an integer \\(bytes\\), got float 1.5"),
    (lambda d: d["search"].update(candidates=1.0), "field 'search.candidates' must be an integer, got float"),
    (lambda d: d["search"]["alternatives"][0].update(step_time_s="n/a"),
     "field 'search.alternatives\\[0\\].step_time_s' must be a number or null"),
    (lambda d: d.update(autoplan_plan=True), "plan format version True is not supported"),
])
def test_a_wrong_type_names_the_field_and_the_type_expected(change, message):
    with pytest.raises((ValueError, autoplan.PlanMismatchError), match=message):
        Plan.from_dict(_edit(change))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(globl_batch_size=64), "plan JSON object has unknown keys \\['globl_batch_size'\\]; known"),
    (lambda d: d["stages"][0].update(recompte=[]), "field 'stages\\[0\\]' has unknown keys \\['recompte'\\]"),
    (lambda d: d["mesh"].update(ep=2), "field 'mesh' has unknown keys \\['ep'\\]"),
    (lambda d: d["predicted"].update(speed=1), "field 'predicted' has unknown keys \\['speed'\\]"),
    (lambda d: d["cluster"].update(gpus=8), "field 'cluster': Cluster dict has unknown keys \\['gpus'\\]"),
])
def test_unknown_keys_are_reported(change, message):
    with pytest.raises(ValueError, match=message):
        Plan.from_dict(_edit(change))


def test_a_numbers_seconds_may_be_integers_and_old_plans_still_load(tmp_path):
    data = _edit(lambda d: d["predicted"].update(step_time_s=2))
    assert Plan.from_dict(data).predicted.step_time_s == 2.0
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(golden_plan().to_dict()))
    assert Plan.load(path) == golden_plan()  # the v1 form without per-stage figures


def test_colwise_without_its_rowwise_partner_is_refused():
    def drop_proj(d):
        for i in range(4):
            del d["tensor_parallel"][f"blocks.{i}.attn.proj"]

    with pytest.raises(ValueError, match="'blocks.0.attn.qkv', 'blocks.1.attn.qkv', .*\\] the style 'colwise' but "
                                         "no 'rowwise' module sits beside them"):
        Plan.from_dict(_edit(drop_proj))
    with pytest.raises(ValueError, match="'rowwise' but no 'colwise' module sits beside it: a rowwise linear needs"):
        golden_plan().replace(tensor_parallel={"blocks.0.mlp.proj": "rowwise"})
    # BERT puts the pair in sibling modules: attention.self.query (colwise), attention.output.dense (rowwise)
    bert = {"l.0.attention.self.query": "colwise", "l.0.attention.output.dense": "rowwise",
            "l.0.intermediate.dense": "colwise", "l.0.output.dense": "rowwise"}
    assert golden_plan().replace(tensor_parallel=bert).tensor_parallel == bert


def test_a_loaded_plan_with_a_lone_colwise_changes_nothing(tmp_path):
    """The refusal happens at load, before parallelize touches the model."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(layers=1, hidden=16, heads=2, vocab_size=32, seq_len=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from autoplan.execute.manual import manual_plan

    plan = manual_plan(model, [["tok", "pos", "blocks.0", "ln_f", "head"]], global_batch_size=2)
    data = plan.to_dict()
    data["mesh"]["tp"] = 1
    data["tensor_parallel"] = {}
    Plan.from_dict(data)  # the plan itself is fine
    data["cluster"]["devices_per_node"] = 2
    data["mesh"]["tp"] = 2
    data["tensor_parallel"] = {"blocks.0.mlp.fc": "colwise"}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="needs its rowwise partner in the same parent"):
        autoplan.parallelize(model, plan=str(path))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model.blocks[0].mlp.fc.weight, "placements")  # not a DTensor: nothing was sharded


class _InnerTie(torch.nn.Module):
    """An encoder-decoder in miniature: the decoder's embedding (an inner layer) shares the encoder's weight."""

    def __init__(self):
        super().__init__()
        self.enc_emb = torch.nn.Embedding(32, 16)
        self.enc = torch.nn.Linear(16, 16)
        self.dec_emb = torch.nn.Embedding(32, 16)
        self.dec_emb.weight = self.enc_emb.weight
        self.dec = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 32)

    def forward(self, ids):
        return self.head(self.dec(self.dec_emb(ids) + self.enc(self.enc_emb(ids))))


def test_interleaved_stages_of_one_rank_sharing_a_tied_weight_are_refused_under_data_parallelism():
    from autoplan.errors import PlanMismatchError
    from autoplan.execute.manual import manual_plan
    from autoplan.execute.validate import check_plan_matches

    model = _InnerTie()
    stages = [["enc_emb"], ["enc"], ["dec_emb"], ["dec", "head"]]  # stages 0 and 2 run on pipeline rank 0
    plan = manual_plan(model, stages, pp=2, dp=2, global_batch_size=8, microbatches=2, schedule="interleaved")
    with pytest.raises(PlanMismatchError, match=r"stages \[0, 2\] hold the tied weight 'enc_emb.weight'"):
        check_plan_matches(plan, model, world_size=4)
    check_plan_matches(manual_plan(model, stages, pp=2, tp=2, global_batch_size=8, microbatches=2,
                                   schedule="interleaved"), model, world_size=4)  # no data parallelism: sound
    moved = [["enc_emb"], ["enc", "dec_emb"], ["dec"], ["head"]]  # stages 0 and 1: two ranks
    check_plan_matches(manual_plan(model, moved, pp=2, dp=2, global_batch_size=8, microbatches=2,
                                   schedule="interleaved"), model, world_size=4)
    # the planner never offers such a layout: under dp > 1 it keeps to 1f1b / gpipe, and says why when pinned
    ids = torch.randint(0, 32, (8, 4))
    cluster = autoplan.Cluster.preset("cpu", devices_per_node=4)
    planned = autoplan.plan(model, ids, cluster=cluster, mesh={"pp": 2, "dp": 2}, precision="fp32")
    assert planned.schedule != "interleaved"
    with pytest.raises(ValueError, match="tied weight 'enc_emb.weight'"):
        autoplan.plan(model, ids, cluster=cluster, mesh={"pp": 2, "dp": 2}, schedule="interleaved",
                      precision="fp32")
