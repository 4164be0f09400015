"""Models built on meta, loading and checkpoints in one process (quick): initialization rules and their errors,
safetensors files and indexes, asynchronous checkpoints. The multi-rank behaviour is in test_lifecycle.py."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import autoplan
from autoplan.execute.manual import manual_plan
from autoplan.models import GPT, GPTConfig

pytestmark = pytest.mark.filterwarnings("ignore")

CONFIG = GPTConfig(vocab_size=32, seq_len=8, hidden=16, layers=2, heads=2)
LAYERS = ["tok", "pos", "blocks.0", "blocks.1", "ln_f", "head"]


def meta_gpt() -> GPT:
    with torch.device("meta"):
        return GPT(CONFIG)


def one_process(model: nn.Module, **kwargs) -> autoplan.execute.ParallelModel:
    return autoplan.parallelize(model, plan=manual_plan(model, [LAYERS], global_batch_size=4), **kwargs)


def batch():
    tokens = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.seq_len + 1), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1], tokens[:, 1:]


def test_default_init_is_reset_parameters_and_depends_on_rank0_seed_only():
    torch.manual_seed(3)
    first = one_process(meta_gpt()).full_state_dict()
    torch.manual_seed(3)
    again = one_process(meta_gpt()).full_state_dict()
    torch.manual_seed(4)
    other = one_process(meta_gpt()).full_state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])
    assert torch.equal(first["blocks.0.ln1.weight"], torch.ones(CONFIG.hidden))  # LayerNorm.reset_parameters
    bound = 1 / CONFIG.hidden**0.5  # Linear.reset_parameters: kaiming uniform within ±1/sqrt(fan_in)
    assert first["blocks.0.attn.qkv.weight"].abs().max() <= bound
    assert torch.equal(first["tok.weight"], first["head.weight"])  # still one tied tensor


def test_custom_init_weights_runs_per_module_and_gaps_are_errors():
    def gpt_init(module):
        if isinstance(module, nn.LayerNorm):
            module.reset_parameters()
        else:
            GPT._init(module)

    sd = one_process(meta_gpt(), init_weights=gpt_init).full_state_dict()
    assert 0.015 < float(sd["blocks.0.mlp.fc.weight"].std()) < 0.025  # normal(0, 0.02)
    assert torch.equal(sd["blocks.0.mlp.fc.bias"], torch.zeros_like(sd["blocks.0.mlp.fc.bias"]))
    with pytest.raises(ValueError, match=r"init_weights left 'blocks.0.ln1.weight'.*init_weights=fn"):
        one_process(meta_gpt(), init_weights=GPT._init)  # LayerNorm left unset

    class Scale(nn.Module):  # a parameter and no reset_parameters
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.gain

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), Scale())
    with pytest.raises(ValueError, match=r"Scale.reset_parameters\(\) left '1.gain'"):
        autoplan.parallelize(model, plan=manual_plan(model, [["0", "1"]], global_batch_size=2))
    with pytest.raises(ValueError, match="init_weights must be a function"):
        one_process(meta_gpt(), init_weights="normal")


def test_mixed_meta_model_and_training_before_loading_are_refused():
    model = meta_gpt()
    model.ln_f.to_empty(device="cpu")
    with pytest.raises(ValueError, match="tensors on the meta device and others elsewhere"):
        one_process(model)
    pm = one_process(meta_gpt(), init_weights=False)
    with pytest.raises(ValueError, match="init_weights=False, so its weights are uninitialized"):
        pm.train_step(*batch())
    pm.load_state_dict(GPT(CONFIG).state_dict())
    assert isinstance(pm.train_step(*batch()), float)


def test_load_state_dict_errors_name_the_keys():
    pm = one_process(meta_gpt(), init_weights=False)
    full = GPT(CONFIG).state_dict()
    del full["head.weight"]  # a tied group needs one of its names
    pm.load_state_dict(full)
    with pytest.raises(ValueError, match=r"missing \['pos.weight'\], unexpected \['extra'\]"):
        pm.load_state_dict({**{k: v for k, v in full.items() if k != "pos.weight"}, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"pos.weight: the given tensor has shape \(4, 16\) but the model's is"):
        pm.load_state_dict({**full, "pos.weight": torch.zeros(4, 16)})


def test_safetensors_file_and_sharded_index_round_trip(tmp_path):
    from safetensors.torch import save_file

    source = GPT(CONFIG)
    pm = one_process(source)
    autoplan.save_safetensors(pm, tmp_path / "single" / "model.safetensors")
    target = one_process(meta_gpt(), init_weights=False)
    autoplan.load_safetensors(target, tmp_path / "single")
    want = source.state_dict()
    assert all(torch.equal(target.full_state_dict()[k], want[k]) for k in want)

    # a Hugging Face-style index over two files, keys under a prefix, the tied head left out
    keys = [k for k in want if k != "head.weight"]
    half = len(keys) // 2
    parts = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, part in parts.items():
        save_file({f"model.{k}": want[k].contiguous() for k in part}, str(tmp_path / name))
    index = {"weight_map": {f"model.{k}": name for name, part in parts.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    target = one_process(meta_gpt(), init_weights=False)
    autoplan.load_safetensors(target, tmp_path / "model.safetensors.index.json",
                              key_map=lambda k: k.removeprefix("model."))
    assert all(torch.equal(target.full_state_dict()[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="missing"):
        autoplan.load_safetensors(target, tmp_path / "model.safetensors.index.json")  # without the key map


def test_async_checkpoint_resumes_like_uninterrupted_training(tmp_path):
    data = [batch()] * 4
    torch.manual_seed(0)
    reference = GPT(CONFIG)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    pm = one_process(reference)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    losses = []
    for inputs, targets in data:
        losses.append(pm.train_step(inputs, targets))
        opt.step()
        opt.zero_grad()

    model = GPT(CONFIG)
    model.load_state_dict(start)
    pm = one_process(model)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    for inputs, targets in data[:2]:
        pm.train_step(inputs, targets)
        opt.step()
        opt.zero_grad()
    pm.save_checkpoint(tmp_path / "ckpt", optimizer=opt, extra={"step": 2}, async_save=True).result()
    resumed = one_process(meta_gpt(), init_weights=False)
    opt = torch.optim.SGD(resumed.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="holds the state of an optimizer of type AdamW, not SGD"):
        resumed.load_checkpoint(tmp_path / "ckpt", optimizer=opt)
    opt = torch.optim.AdamW(resumed.parameters(), lr=0.5)  # the saved lr (1e-2) wins
    assert resumed.load_checkpoint(tmp_path / "ckpt", optimizer=opt) == {"step": 2}
    assert opt.param_groups[0]["lr"] == 1e-2
    tail = []
    for inputs, targets in data[2:]:
        tail.append(resumed.train_step(inputs, targets))
        opt.step()
        opt.zero_grad()
    assert tail == pytest.approx(losses[2:], rel=1e-6)
    with pytest.raises(ValueError, match="no DCP metadata"):
        resumed.load_checkpoint(tmp_path / "nowhere")


def test_timeout_reaches_the_process_group(monkeypatch):
    """parallelize(timeout=s) creates the default process group with that timeout; non-positive ones are refused."""
    from datetime import timedelta

    import autoplan.execute.world as world

    seen = {}

    def fake_init(backend, timeout=None):
        seen.update(backend=backend, timeout=timeout)
        raise RuntimeError("stop here")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(world.dist, "init_process_group", fake_init)
    model = GPT(CONFIG)
    plan = manual_plan(model, [LAYERS], dp=2, global_batch_size=4)
    with pytest.raises(RuntimeError, match="stop here"):
        autoplan.parallelize(model, plan=plan, timeout=5)
    assert seen == {"backend": "gloo", "timeout": timedelta(seconds=5)}
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        autoplan.parallelize(GPT(CONFIG), plan=plan, timeout=0)


def test_init_weights_false_needs_every_tensor_in_the_state_dict():
    class WithMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("mask", torch.ones(4), persistent=False)

        def forward(self, x):
            return self.lin(x) * self.mask

    with torch.device("meta"):
        model = WithMask()
    with pytest.raises(ValueError, match=r"buffers \['mask'\] are not saved in state dicts"):
        autoplan.parallelize(model, plan=manual_plan(model, [["lin"]], global_batch_size=2), init_weights=False)


def test_hugging_face_checkpoint_loads_into_a_model_built_on_meta(tmp_path):
    """A transformers GPT-2 saved with save_pretrained (model.safetensors, tied lm_head left out) loads into the
    same architecture built on meta and gives the same logits."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    source = transformers.GPT2LMHeadModel(config).eval()
    source.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    layers = ["transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h.0", "transformer.h.1",
              "transformer.ln_f", "lm_head"]
    pm = autoplan.parallelize(model, plan=manual_plan(model, [layers], global_batch_size=2), init_weights=False)
    autoplan.load_safetensors(pm, tmp_path)
    pm.eval()
    tokens = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.allclose(pm(tokens).logits, source(tokens).logits, atol=1e-5)


def test_transformers_model_on_meta_initializes_as_the_library_does():
    """A Llama built on meta (RMSNorm has no reset_parameters, the rotary tables are computed in __init__) gets
    its model's own _init_weights by default: norms at one, rotary tables equal to a CPU-built model's,
    projections at the config's initializer_range; then it trains with the default loss on its ModelOutput."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05)
    cpu_built = transformers.LlamaForCausalLM(config)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    layers = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    pm = autoplan.parallelize(model, plan=manual_plan(model, [layers], global_batch_size=2))
    state = pm.full_state_dict()
    assert torch.equal(state["model.norm.weight"], torch.ones(32))
    assert torch.equal(model.model.rotary_emb.inv_freq, cpu_built.model.rotary_emb.inv_freq)
    assert state["lm_head.weight"].std().item() == pytest.approx(0.05, rel=0.1)
    tokens = torch.randint(0, 64, (2, 9))
    assert torch.isfinite(torch.tensor(pm.train_step(tokens[:, :-1], tokens[:, 1:])))
