"""Tiny Hugging Face models with random weights, for tracing tests (transformers 5.x, ``use_cache=False``).

Each builder returns ``(model, example_inputs)``; ``device="meta"`` builds the same model without weights.

Example:
    >>> model, inputs = hf_llama()                                   # doctest: +SKIP
    >>> sorted(inputs)                                               # doctest: +SKIP
    ['input_ids']
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

BATCH, SEQ, VOCAB = 2, 16, 128


def _ids(batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB) -> dict:
    return {"input_ids": torch.randint(0, vocab, (batch, seq))}


def _build(model_cls, config, device):
    with torch.device(device) if device is not None else nullcontext():
        model = model_cls(config)
    return model.train()


def hf_gpt2(device=None):
    """GPT-2 LM head model: 2 layers, 4 heads, hidden 32 (its projections are Conv1D, not nn.Linear)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4, use_cache=False,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _build(GPT2LMHeadModel, cfg, device), _ids()


def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=SEQ, use_cache=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def hf_llama(device=None, **overrides):
    """Llama causal LM: 2 layers, 4 query heads over 2 key/value heads, hidden 32."""
    from transformers import LlamaForCausalLM

    return _build(LlamaForCausalLM, llama_config(**overrides), device), _ids()


def hf_llama_7b_meta(seq: int = 128):
    """A Llama-7B-shaped model on the meta device (no weights) with one example sequence."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    return _build(LlamaForCausalLM, cfg, "meta"), _ids(batch=1, seq=seq, vocab=32000)


def hf_qwen2(device=None):
    """Qwen2 causal LM (q/k/v projections with bias), 2 layers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, use_cache=False)
    return _build(Qwen2ForCausalLM, cfg, device), _ids()


def hf_bert(device=None):
    """BERT encoder with its masked-LM head, 2 layers, no dropout."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return _build(BertForMaskedLM, cfg, device), _ids()


def hf_mistral(device=None):
    """Mistral causal LM (grouped key/value heads), 2 layers."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, use_cache=False)
    return _build(MistralForCausalLM, cfg, device), _ids()


def hf_t5(device=None):
    """T5 encoder-decoder with its LM head, 2 + 2 layers, no dropout; decoder ids given explicitly."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                   use_cache=False, decoder_start_token_id=0)
    inputs = _ids()
    inputs["decoder_input_ids"] = torch.randint(0, VOCAB, (BATCH, SEQ))
    return _build(T5ForConditionalGeneration, cfg, device), inputs


def hf_vit(device=None):
    """ViT image classifier on 32×32 images in 8×8 patches, 2 layers."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _build(ViTForImageClassification, cfg, device), {"pixel_values": torch.randn(BATCH, 3, 32, 32)}
