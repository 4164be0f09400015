"""Tiny Hugging Face models (transformers 5.x) with random weights and DEFAULT configs apart from their sizes: the
generation cache stays on (``use_cache=True``), dropout stays as configured; tracing must cope by itself.

``FAMILIES`` maps a family name to a builder ``(device=None) -> (model, example_inputs)``; ``device="meta"`` builds
the same model without weights. Every family: hidden 32, 4 query heads (2 key/value heads where the family has
grouped heads), 2 layers (2 + 2 for encoder-decoders), vocabulary 128, batch 2 × 16 tokens.

Example:
    >>> model, inputs = FAMILIES["llama"]()                         # doctest: +SKIP
    >>> sorted(inputs)                                               # doctest: +SKIP
    ['input_ids']
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

BATCH, SEQ, VOCAB = 2, 16, 128
HIDDEN, HEADS, KV_HEADS, INTER, LAYERS = 32, 4, 2, 64, 2


def _ids(batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB) -> dict:
    return {"input_ids": torch.randint(0, vocab, (batch, seq))}


def _seq2seq_ids() -> dict:
    return {**_ids(), "decoder_input_ids": torch.randint(0, VOCAB, (BATCH, SEQ))}


def _build(model_cls, config, device):
    with torch.device(device) if device is not None else nullcontext():
        model = model_cls(config)
    return model.train()


def _decoder_kw(**overrides) -> dict:
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64)
    kw.update(overrides)
    return kw


def _causal(config_name: str, model_name: str, **overrides):
    def build(device=None, **more):
        import transformers

        config = getattr(transformers, config_name)(**_decoder_kw(**{**overrides, **more}))
        return _build(getattr(transformers, model_name), config, device), _ids()

    build.__doc__ = f"{model_name} from a default {config_name} at toy size"
    return build


def hf_gpt2(device=None):
    """GPT-2 LM head model (its projections are Conv1D, q/k/v fused in c_attn)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS)
    return _build(GPT2LMHeadModel, cfg, device), _ids()


def hf_opt(device=None):
    """OPT causal LM (q/k/v/out projections with bias, learned positions offset by 2)."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTER, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, max_position_embeddings=64, word_embed_proj_dim=HIDDEN, pad_token_id=1)
    return _build(OPTForCausalLM, cfg, device), _ids()


def hf_bloom(device=None):
    """BLOOM causal LM (fused query_key_value laid out per head, ALiBi)."""
    from transformers import BloomConfig, BloomForCausalLM

    return _build(BloomForCausalLM, BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS),
                  device), _ids()


def hf_bert(device=None):
    """BERT encoder with its masked-LM head."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=INTER, max_position_embeddings=64)
    return _build(BertForMaskedLM, cfg, device), _ids()


def hf_t5(device=None):
    """T5 encoder-decoder with its LM head (relative position bias); decoder ids given explicitly."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=INTER, num_layers=LAYERS,
                   num_heads=HEADS, decoder_start_token_id=0)
    return _build(T5ForConditionalGeneration, cfg, device), _seq2seq_ids()


def hf_bart(device=None):
    """BART encoder-decoder with its LM head; decoder ids given explicitly."""
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                     encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=INTER,
                     decoder_ffn_dim=INTER, max_position_embeddings=64)
    return _build(BartForConditionalGeneration, cfg, device), _seq2seq_ids()


def hf_vit(device=None):
    """ViT image classifier on 32×32 images in 8×8 patches."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, intermediate_size=INTER, num_labels=10)
    return _build(ViTForImageClassification, cfg, device), {"pixel_values": torch.randn(BATCH, 3, 32, 32)}


hf_llama = _causal("LlamaConfig", "LlamaForCausalLM")
hf_mistral = _causal("MistralConfig", "MistralForCausalLM")
hf_qwen2 = _causal("Qwen2Config", "Qwen2ForCausalLM")
hf_qwen3 = _causal("Qwen3Config", "Qwen3ForCausalLM", head_dim=HIDDEN // HEADS)
hf_gemma = _causal("GemmaConfig", "GemmaForCausalLM", head_dim=HIDDEN // HEADS)
hf_phi3 = _causal("Phi3Config", "Phi3ForCausalLM", pad_token_id=0)
hf_mixtral = _causal("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2)
hf_qwen2_moe = _causal("Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=INTER)

FAMILIES = {
    "gpt2": hf_gpt2, "llama": hf_llama, "mistral": hf_mistral, "qwen2": hf_qwen2, "qwen3": hf_qwen3,
    "gemma": hf_gemma, "phi3": hf_phi3, "opt": hf_opt, "bloom": hf_bloom, "bert": hf_bert, "t5": hf_t5,
    "bart": hf_bart, "vit": hf_vit, "mixtral": hf_mixtral, "qwen2_moe": hf_qwen2_moe,
}


class FusedQKVAttention(torch.nn.Module):
    """nanoGPT's attention: one fused ``c_attn`` Linear whose output is cut by ``.split(n_embd, dim=2)`` into q, k,
    v blocks, heads by ``view(B, T, n_head, head_dim)``."""

    def __init__(self, n_embd: int = HIDDEN, n_head: int = HEADS):
        super().__init__()
        self.n_embd, self.n_head = n_embd, n_head
        self.c_attn = torch.nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = torch.nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class FusedQKVBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(HIDDEN), torch.nn.LayerNorm(HIDDEN)
        self.attn = FusedQKVAttention()
        self.mlp = torch.nn.Sequential()
        self.mlp.c_fc, self.mlp.gelu, self.mlp.c_proj = (torch.nn.Linear(HIDDEN, INTER), torch.nn.GELU(),
                                                         torch.nn.Linear(INTER, HIDDEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class FusedQKVGPT(torch.nn.Module):
    """A hand-written nanoGPT-style language model (fused qkv split by position), 2 blocks."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(VOCAB, HIDDEN), torch.nn.Embedding(SEQ, HIDDEN)
        self.h = torch.nn.ModuleList(FusedQKVBlock() for _ in range(LAYERS))
        self.ln_f = torch.nn.LayerNorm(HIDDEN)
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def phi3_mha(device=None):
    """Phi-3 with as many key/value heads as query heads (Phi-3-mini's layout): its fused ``qkv_proj`` has three
    equal parts, sliced at ``config.num_attention_heads * head_dim``."""
    return hf_phi3(device, num_key_value_heads=HEADS)


def fused_qkv_gpt(device=None):
    """:class:`FusedQKVGPT` and a batch of token ids."""
    with torch.device(device) if device is not None else nullcontext():
        model = FusedQKVGPT()
    return model, torch.randint(0, VOCAB, (BATCH, SEQ))
