"""Reference models: a GPT (tied embeddings, pre-norm blocks) and an MLP, from toy to GPT-3 size.

The same code builds a 34-thousand-parameter debug model and a 175B model on the meta device, so tests,
examples and benchmarks all exercise one code path.

Example:
    >>> import torch
    >>> from autoplan.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig.preset("debug"))
    >>> model(torch.randint(0, 256, (2, 16))).shape
    torch.Size([2, 16, 256])
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTConfig", "GPT", "Block", "MLP", "gpt_forward_flops", "gpt", "gpt3_175b", "gpt_1_3b", "gpt_debug"]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    seq_len: int = 16
    hidden: int = 32
    layers: int = 2
    heads: int = 4
    tie_embeddings: bool = True

    @staticmethod
    def preset(name: str, **overrides) -> "GPTConfig":
        """Named sizes: "debug", "gpt2-125m", "gpt-350m", "gpt-1.3b", "gpt-6.7b", "gpt3-175b".

        Example:
            >>> GPTConfig.preset("gpt3-175b").layers
            96
        """
        presets = {
            "debug": GPTConfig(),
            "gpt2-125m": GPTConfig(50304, 1024, 768, 12, 12),
            "gpt-350m": GPTConfig(50304, 1024, 1024, 24, 16),
            "gpt-1.3b": GPTConfig(50304, 2048, 2048, 24, 16),
            "gpt-6.7b": GPTConfig(50304, 2048, 4096, 32, 32),
            "gpt3-175b": GPTConfig(51200, 2048, 12288, 96, 96),
        }
        if name not in presets:
            raise ValueError(f"unknown GPT preset {name!r}; choose one of {sorted(presets)}")
        return replace(presets[name], **overrides)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.hidden % cfg.heads:
            raise ValueError(f"hidden ({cfg.hidden}) must be divisible by heads ({cfg.heads})")
        self.head_dim = cfg.hidden // cfg.heads
        # qkv's output features are laid out head-major, (heads, 3, head_dim), so that a column-wise shard
        # holds whole heads with their q, k and v.
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 heads (not cfg.heads) so the module also runs with a tensor-parallel shard of the heads.
        q, k, v = self.qkv(x).view(B, T, -1, 3, self.head_dim).unbind(dim=3)  # each (B, T, nh, hd)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh·hd)
        return self.proj(y)


class FeedForward(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc = nn.Linear(hidden, 4 * hidden)
        self.proj = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.mlp = FeedForward(cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer; ``head.weight`` is ``tok.weight`` when ``tie_embeddings``.

    With tied embeddings it has Narayanan et al. SC'21 Eq. 2's parameters, 12lh²(1 + 13/(12h) + (V + s)/(12lh))
    (l blocks of 12h² + 13h, token and position embeddings), plus 2h for the final LayerNorm.

    Example:
        >>> cfg = GPTConfig.preset("debug")
        >>> l, h, V, s = cfg.layers, cfg.hidden, cfg.vocab_size, cfg.seq_len
        >>> sum(p.numel() for p in GPT(cfg).parameters()), 12 * l * h * h + 13 * l * h + (V + s) * h + 2 * h
        (34176, 34176)
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.device.type != "meta":
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.tok(idx) + self.pos(pos)  # (B, T, h)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, V)


class MLP(nn.Module):
    """A stack of Linear+ReLU layers in an ``nn.Sequential`` called ``layers``.

    Example:
        >>> MLP(16, 32, depth=3)(torch.randn(4, 16)).shape
        torch.Size([4, 16])
    """

    def __init__(self, features: int = 64, hidden: int = 256, depth: int = 4):
        super().__init__()
        mods: list[nn.Module] = []
        for i in range(depth):
            mods += [nn.Linear(features if i == 0 else hidden, hidden), nn.ReLU()]
        mods.append(nn.Linear(hidden, features))
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def gpt_forward_flops(cfg: GPTConfig, batch: int, seq: int | None = None) -> float:
    """Closed-form forward FLOPs of :class:`GPT`: 24·B·s·h²·L·(1 + s/6h) + 2·B·s·h·V.

    Narayanan et al. SC'21 Eq. 3, 96·B·s·L·h²(1 + s/6h + V/16Lh), counts four passes of the blocks (forward,
    backward at twice the forward, and the forward again for recompute) and three of the logit layer (not
    recomputed): one forward is a quarter of its block term and a third of its logit term.

    Example:
        >>> gpt_forward_flops(GPTConfig.preset("debug"), batch=1)   # 24·16·32²·2·(1 + 16/192) + 2·16·32·256
        1114112.0
    """
    s = cfg.seq_len if seq is None else seq
    h, L, V = cfg.hidden, cfg.layers, cfg.vocab_size
    return 24 * batch * s * h * h * L * (1 + s / (6 * h)) + 2 * batch * s * h * V


def gpt(preset: str = "debug", batch_size: int = 8, device: str | torch.device | None = None, **overrides):
    """A GPT of a named size and example token ids for it: ``(model, (tokens,))``.

    Large presets are best built with ``device="meta"`` (no memory is allocated), which is how the planner and
    the command line use them.

    Example:
        >>> model, (tokens,) = gpt("debug", batch_size=2)
        >>> tokens.shape
        torch.Size([2, 16])
    """
    cfg = GPTConfig.preset(preset, **overrides)
    with torch.device(device) if device is not None else nullcontext():
        model = GPT(cfg)
        tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len))
    return model, (tokens,)


def gpt3_175b():
    """GPT-3 175B on the meta device with one example sequence (for ``autoplan plan autoplan.models:gpt3_175b``)."""
    return gpt("gpt3-175b", batch_size=1, device="meta")


def gpt_1_3b():
    """A 1.3B GPT on the meta device with one example sequence."""
    return gpt("gpt-1.3b", batch_size=1, device="meta")


def gpt_debug():
    """The debug GPT (34K parameters) on the CPU with a batch of 8."""
    return gpt("debug", batch_size=8)
