"""A tiny plain-torch model whose attention fuses q, k and v of unequal sizes in one linear (grouped key/value heads,
as Phi-3's ``qkv_proj``): tracing shards it as ``colwise:32+16+16``, which the executor runs with the row
all-to-alls of :class:`autoplan.execute.tp_styles.FusedRowsColwise`.

The parts are cut with ``aten.slice`` as ``torch.export`` records ``qkv[..., a:b]`` (what tracing reads the parts
from); the head counts are attributes, which a tensor-parallel shard divides by t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN, HEADS, KV_HEADS, SEQ, FEATURES = 32, 4, 2, 8, 16
LAYERS = ["inp", "blocks.0", "blocks.1", "out"]


class GroupedAttention(nn.Module):
    """Causal attention with ``num_key_value_heads`` key/value heads shared by ``num_heads`` query heads."""

    def __init__(self, hidden: int = HIDDEN, heads: int = HEADS, kv_heads: int = KV_HEADS, bias: bool = True):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(heads * self.head_dim, hidden)

    def forward(self, x):
        B, T, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        qkv, cut = self.qkv(x), torch.ops.aten.slice.Tensor
        q, k, v = (cut(qkv, -1, start, start + size).view(B, T, -1, self.head_dim).transpose(1, 2)
                   for start, size in ((0, q_size), (q_size, kv_size), (q_size + kv_size, kv_size)))
        repeat = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1),
                                             is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.ln = nn.LayerNorm(HIDDEN)
        self.attn = GroupedAttention(bias=bias)

    def forward(self, x):
        return x + self.attn(self.ln(x))


class GroupedModel(nn.Module):
    """Features → two blocks of grouped-head attention → features; with ``bias``, the first block's ``qkv`` has a
    bias (the second never has: FSDP refuses a fused projection's bias split over tp)."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.inp = nn.Linear(FEATURES, HIDDEN)
        self.blocks = nn.ModuleList([Block(bias=bias), Block(bias=False)])
        self.out = nn.Linear(HIDDEN, FEATURES)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def build_gqa(kind: str = "gqa") -> GroupedModel:
    """``gqa`` (the first ``qkv`` with a bias) or ``gqa-nobias``."""
    torch.manual_seed(1234)
    return GroupedModel(bias=kind == "gqa")


def gqa_batches(global_batch: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(99)
    return [(torch.randn(global_batch, SEQ, FEATURES, generator=g), torch.randn(global_batch, SEQ, FEATURES,
                                                                               generator=g)) for _ in range(steps)]


def gqa_styles() -> dict[str, str]:
    """The styles tracing finds (tests/test_collective_counts.py checks it does)."""
    styles = {}
    for i in range(2):
        styles.update({f"blocks.{i}.attn.qkv": "colwise:32+16+16", f"blocks.{i}.attn.proj": "rowwise"})
    return styles
