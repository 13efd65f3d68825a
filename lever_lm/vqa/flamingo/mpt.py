"""MPT-1B (MosaicML's `MosaicGPT`, the language model of OpenFlamingo-3B), ported to plain torch.

MPT-1B RedPajama-200B is a GPT-style decoder: 24 blocks of pre-LayerNorm attention and GELU MLP,
width 2048, 16 heads. What sets it apart from GPT-2:
- no position embeddings: ALiBi, a per-head linear penalty on the distance to each key;
- QK LayerNorm: queries and keys are layer-normalised (over the full width) before the heads split;
- no biases anywhere, LayerNorms included;
- the output projection is the input embedding (tied).

Module and parameter names are those of the original (`transformer.wte`, `transformer.blocks.N.attn.Wqkv`,
...), so MPT-1B's weight file loads by name. The attention follows the original's arithmetic: scores
`q k^T * scale + alibi`, masked positions set to the dtype's minimum (not added to), then softmax.
Keys and values of earlier tokens live in a Hugging Face `Cache` so generation reads each prompt once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lever_lm.errors import InputError

# `config.json` settings of the original that this port implements only at one value.
_REQUIRED = {"alibi": True, "prefix_lm": False, "attn_uses_sequence_id": False}


@dataclass(frozen=True)
class MPTConfig:
    """The settings of `config.json` (MosaicGPT format) that shape the computation."""

    d_model: int
    n_heads: int
    n_layers: int
    mlp_ratio: int
    vocab_size: int
    max_seq_len: int
    alibi_bias_max: float = 8.0
    qk_ln: bool = True
    clip_qkv: float | None = None
    softmax_scale: float | None = None
    bias: bool = False
    logit_scale: float | None = None

    @classmethod
    def from_json(cls, path: Path) -> MPTConfig:
        """Read an MPT-1B `config.json`; a setting this port does not implement is an InputError."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            config = cls(
                d_model=int(raw["d_model"]),
                n_heads=int(raw["n_heads"]),
                n_layers=int(raw["n_layers"]),
                mlp_ratio=int(raw["mlp_ratio"]),
                vocab_size=int(raw["vocab_size"]),
                max_seq_len=int(raw["max_seq_len"]),
                alibi_bias_max=float(raw.get("alibi_bias_max", 8)),
                qk_ln=bool(raw.get("attn_qk_ln", False)),
                clip_qkv=raw.get("attn_clip_qkv"),
                softmax_scale=raw.get("softmax_scale"),
                bias=not raw.get("no_bias", False),
                logit_scale=_logit_scale(raw.get("logit_scale"), int(raw["d_model"])),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(path, f"not an MPT (MosaicGPT) config: {type(error).__name__}: {error}") from None
        for key, value in _REQUIRED.items():
            if raw.get(key, value) != value:
                raise InputError(path, f"'{key}: {raw[key]}' is not supported (OpenFlamingo's MPT-1B has {value})")
        if config.d_model % config.n_heads:
            raise InputError(path, f"d_model {config.d_model} is not a multiple of n_heads {config.n_heads}")
        return config

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _logit_scale(value, d_model: int) -> float | None:
    if value == "inv_sqrt_d_model":
        return d_model**-0.5
    return None if value is None else float(value)


class MPTAttention(nn.Module):
    """Causal self-attention with QK LayerNorm; the ALiBi/causal/padding bias comes from the caller."""

    def __init__(self, config: MPTConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.Wqkv = nn.Linear(d, 3 * d, bias=config.bias)
        if config.qk_ln:
            self.q_ln = nn.LayerNorm(d, bias=config.bias)
            self.k_ln = nn.LayerNorm(d, bias=config.bias)
        self.out_proj = nn.Linear(d, d, bias=config.bias)
        self.scale = config.softmax_scale or config.head_dim**-0.5

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        """x [B, S, D], bias [B, H, S, K] (K = cached + S keys) -> [B, S, D]."""
        B, S, D = x.shape
        qkv = self.Wqkv(x)  # [B, S, 3D]
        if self.config.clip_qkv:
            qkv = qkv.clamp(-self.config.clip_qkv, self.config.clip_qkv)
        q, k, v = qkv.chunk(3, dim=-1)  # [B, S, D] each
        if self.config.qk_ln:
            q, k = self.q_ln(q), self.k_ln(k)
        H, hd = self.config.n_heads, self.config.head_dim
        q, k, v = (t.view(B, S, H, hd).transpose(1, 2) for t in (q, k, v))  # [B, H, S, hd]
        if cache is not None:
            k, v = cache.update(k, v, layer)  # [B, H, K, hd]
        scores = q @ k.transpose(-1, -2) * self.scale + bias  # [B, H, S, K]
        y = scores.softmax(dim=-1) @ v  # [B, H, S, hd]
        return self.out_proj(y.transpose(1, 2).reshape(B, S, D))


class MPTMLP(nn.Module):
    def __init__(self, config: MPTConfig):
        super().__init__()
        self.mlp_up = nn.Linear(config.d_model, config.mlp_ratio * config.d_model, bias=config.bias)
        self.mlp_down = nn.Linear(config.mlp_ratio * config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_down(F.gelu(self.mlp_up(x)))


class MPTBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: MPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = MPTAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MPTMLP(config)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), bias, cache, layer)
        return x + self.mlp(self.ln_2(x))


class MPT(nn.Module):
    """The decoder: embeddings in (`embed`), blocks (run by the caller, which interleaves the
    Flamingo cross-attention), logits out (`logits`); `attention_bias` builds what every block needs."""

    def __init__(self, config: MPTConfig, vocab_rows: int | None = None):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab_rows or config.vocab_size, config.d_model),
                "blocks": nn.ModuleList(MPTBlock(config) for _ in range(config.n_layers)),
                "ln_f": nn.LayerNorm(config.d_model, bias=config.bias),
            }
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer["wte"](input_ids)  # [B, S, D]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(self.transformer["ln_f"](x), self.transformer["wte"].weight)  # [B, S, V]
        return logits if self.config.logit_scale is None else logits * self.config.logit_scale

    def attention_bias(self, attention_mask: torch.Tensor, query_length: int, dtype: torch.dtype) -> torch.Tensor:
        """ALiBi plus the causal and padding masks: [B, H, S, K] for S new tokens after K - S cached ones.

        `attention_mask` [B, K] marks the real (1) and padding (0) keys. ALiBi penalises key j by
        slope_h * (K - 1 - j); the original adds it per key, which equals the per-distance form up
        to a constant per query row (softmax ignores it). Masked entries get the dtype's minimum.
        """
        H, K, S = self.config.n_heads, attention_mask.shape[1], query_length
        device = attention_mask.device
        exponents = torch.arange(1, H + 1, device=device, dtype=dtype) * (self.config.alibi_bias_max / H)
        slopes = 1.0 / 2**exponents  # [H]
        distance = torch.arange(1 - K, 1, device=device, dtype=dtype)  # key j -> j - (K - 1)
        alibi = (slopes[:, None] * distance).view(1, H, 1, K)
        key = torch.arange(K, device=device)
        query = torch.arange(K - S, K, device=device)
        allowed = (key[None, :] <= query[:, None])[None, None] & attention_mask.bool()[:, None, None, :]  # [B,1,S,K]
        return alibi.masked_fill(~allowed, torch.finfo(dtype).min)  # [B, H, S, K]
