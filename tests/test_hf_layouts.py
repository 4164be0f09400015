"""Every transformers family (default configs, toy size) trains under pinned layouts on 4 gloo ranks exactly like
one process, with tensor parallelism that actually shards wherever tracing proved a group sound, and pipelines
(skeleton stages, autoplan.trace.skeleton) alone and with data or tensor parallelism.

The tests of this module share one torchrun world (tests/hf_worker.py) that runs the cases of every selected test:
each family is traced once per world, its one-process reference trained once, and rank 0 compares: losses within
rel 1e-5, final weights within 1e-4 (fp32, dropout off).
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="the family matrix needs transformers")

from distributed_helpers import REPO, run_world, selected_tests  # noqa: E402

import models_hf  # noqa: E402
from hf_worker import case_name  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore")]

WORKER = REPO / "tests" / "hf_worker.py"
#: families with no sound tensor-parallel group (GPT-2 and Phi-3 shard their fused projections part by part)
NOTHING_SOUND: set[str] = set()
#: families whose fused projections a pinned dp2xtp2 must shard (module: style), with a checkpoint round trip; the
#: Phi-3 toy has grouped key/value heads (4 query, 2 key/value heads of 8): its qkv_proj's parts are unequal
FUSED = {"gpt2": {"transformer.h.0.attn.c_attn": "colwise:3"},
         "phi3": {"model.layers.0.mlp.gate_up_proj": "colwise:2",
                  "model.layers.0.self_attn.qkv_proj": "colwise:32+16+16"},
         "phi3_mha": {"model.layers.0.self_attn.qkv_proj": "colwise:3"}}


def meta_reference(family: str) -> dict:
    """The initial weights of ``family``'s toy model built on meta and parallelized in a world of one, under rank 0's
    seed of the ``init_on_meta`` cases."""
    import torch

    import autoplan
    from autoplan.execute.manual import manual_plan
    from hf_worker import META_SEED

    model, _ = models_hf.FAMILIES[family](device="meta")
    torch.manual_seed(META_SEED)
    return autoplan.parallelize(model, plan=manual_plan(model, [[""]], global_batch_size=8)).full_state_dict()


def check_meta(got: dict, family: str) -> None:
    """Initialization on meta is the same tensors, bit for bit and in the original order, sharded or not."""
    import torch

    want = meta_reference(family)
    assert list(got["init"]) == list(want)
    assert [k for k, v in want.items() if not torch.equal(got["init"][k], v)] == []


def check(results: dict) -> None:
    for name, got in results.items():
        family = name.split(":")[0]
        if name.endswith(":meta"):
            assert {m: got["plan"]["tensor_parallel"].get(m) for m in FUSED[family]} == FUSED[family], name
            check_meta(got, family)
            continue
        assert got["losses"] == pytest.approx(got["ref_losses"], rel=1e-5), name
        assert got["missing"] == [], name
        assert got["max_weight_diff"] <= 1e-4, (name, got["worst_weight"], got["max_weight_diff"])
        if "pp" in name:  # pinned pipelines: stages over 2 pipeline ranks (interleaved: several per rank)
            stages = got["plan"]["stages"]
            assert len(stages) >= 2 and len(stages) % 2 == 0 and all(s["layers"] for s in stages), name
        if "tp" in name and family in NOTHING_SOUND:
            assert got["notes"], name  # the plan says why tp does not shard the blocks
        elif "tp" in name:
            assert got["sharded"] > 0, name
        if name.endswith(":sp"):  # sequence parallelism forced: the plan runs it
            assert got["plan"]["sequence_parallel"] is True, name
        if "roundtrip" in got:
            assert got["roundtrip"] == {"checkpoint": 0.0, "state_dict": 0.0, "on_disk": 0.0}, name
        if family in FUSED and (name.endswith(":dp2xtp2") or name.endswith(":dp2xtp2:fsdp")):
            assert {m: got["plan"]["tensor_parallel"].get(m) for m in FUSED[family]} == FUSED[family], name
            # the checkpoint and the full state dict give and take the original fused weights, in order
            assert got["roundtrip"] == {"checkpoint": 0.0, "state_dict": 0.0, "on_disk": 0.0}, name
        if family in FUSED and name.endswith(":tp4"):  # the same fused styles over 4 ranks
            assert {m: got["plan"]["tensor_parallel"].get(m) for m in FUSED[family]} == FUSED[family], name


#: families that pipeline: all (T5's dropout modules run twice per forward; stateless, they are split soundly)
PIPELINED = list(models_hf.FAMILIES)


def pipeline_cases(tmp) -> list[dict]:
    # Llama pp2xtp2 with a checkpoint and state dict round trip; GPT-2 pp2xdp2, its tied embedding and head in
    # different stages (the other two meshes run in the matrix below; tests/test_execute.py checks the same split
    # of both in one process, in the quick tier)
    # Llama pp2xtp2 also with sequence parallelism: the skeleton stages cut the run of decoder layers, each stage
    # splits and gathers its own piece
    return [{"family": "llama", "mesh": {"pp": 2, "tp": 2}, "checkpoint": str(tmp / "checkpoint_llama")},
            {"family": "llama", "mesh": {"pp": 2, "tp": 2}, "sequence_parallel": True},
            {"family": "gpt2", "mesh": {"pp": 2, "dp": 2}},
            # four interleaved stages: pipeline rank 0 holds BART's shared embedding in two of them (the encoder's
            # and the decoder's), whose gradients must be averaged over the microbatches once, not per stage
            {"family": "bart", "mesh": {"pp": 2, "tp": 2}, "cuts": [1, 3, 6]}]


def matrix_cases(tmp) -> list[dict]:
    # dp2xtp2 for every family; tp4 where 4 divides the heads or features: 4 heads over 2 key/value heads, so
    # Llama's tp4 shards its MLPs, the other families' (4 heads each, GPT-2's and nanoGPT's fused c_attn, Phi-3's
    # qkv_proj with as many key/value heads) their attention too
    families = list(models_hf.FAMILIES) + ["fused_qkv_gpt", "phi3_mha"]
    cases = [{"family": f, "mesh": {"dp": 2, "tp": 2}} for f in families]
    # FSDP over a fused projection's part-by-part shard: dp shards the weight's other dim (Phi-3's gate_up_proj;
    # its qkv_proj of unequal parts is stored as a plain colwise shard, which FSDP shards on dim 0)
    cases.append({"family": "phi3", "mesh": {"dp": 2, "tp": 2}, "data_parallel": "fsdp"})
    # Phi-3 built on meta: each rank initializes its shards of the fused projections (qkv_proj of unequal parts)
    cases.append({"family": "phi3", "mesh": {"dp": 2, "tp": 2}, "init_on_meta": True})
    for case in cases:
        if case["family"] in FUSED and not case.get("init_on_meta"):
            case["checkpoint"] = str(tmp / f"checkpoint_{case['family']}_{case.get('data_parallel', 'auto')}")
    cases += [{"family": f, "mesh": {"tp": 4}}
              for f in ("opt", "bert", "llama", "gpt2", "bart", "vit", "fused_qkv_gpt", "phi3_mha")]
    # sequence parallelism forced: Llama's RMSNorms; BART's post-norm layers and its decoder's cross-attention,
    # whose keys and values read the encoder's whole output
    cases += [{"family": f, "mesh": {"dp": 2, "tp": 2}, "sequence_parallel": True} for f in ("llama", "bart")]
    # pipelines: each family is traced once per world (tests/hf_worker.py), so these cost a search and two steps;
    # pp2xtp2 and pp2xdp2 for every family; the pipelines test runs Llama's pp2xtp2 and GPT-2's pp2xdp2
    cases += [{"family": f, "mesh": {"pp": 2, "tp": 2}} for f in PIPELINED if f != "llama"]
    cases += [{"family": f, "mesh": {"pp": 2, "dp": 2}} for f in PIPELINED if f != "gpt2"]
    return cases


TESTS = {"test_llama_and_gpt2_pipelines_match_one_process": pipeline_cases,
         "test_every_family_dp2xtp2_and_tp4_and_pipelines_match_one_process": matrix_cases}


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    """(tmp dir, {case name: rank 0's result}) of one world running the cases of every selected test here."""
    tmp = tmp_path_factory.mktemp("hf_world")
    cases = [case for test, cases_of in TESTS.items() if test in selected_tests(request) for case in cases_of(tmp)]
    return tmp, run_world(cases, tmp, timeout_s=max(600, 40 * len(cases)), worker=WORKER)


def check_own(world, test: str) -> None:
    tmp, results = world
    names = [case_name(case) for case in TESTS[test](tmp)]
    assert len(set(names)) == len(names)
    check({name: results[name] for name in names})


@pytest.mark.slow
def test_llama_and_gpt2_pipelines_match_one_process(world):
    check_own(world, "test_llama_and_gpt2_pipelines_match_one_process")


@pytest.mark.slow
def test_every_family_dp2xtp2_and_tp4_and_pipelines_match_one_process(world):
    check_own(world, "test_every_family_dp2xtp2_and_tp4_and_pipelines_match_one_process")
