"""The perceiver resampler: each image's 256 CLIP patch tokens become 64 latent tokens (OpenFlamingo).

64 learned latents attend, six times, to the image's tokens concatenated with themselves; each layer
is attention then a feed-forward, both residual, and a final LayerNorm. Every image is resampled on
its own (the original's time and frame axes never mix), so the result can be cached per image.
Sizes are the original's fixed ones: 8 heads of 64, 64 latents, depth 6, feed-forward x4.
"""

from __future__ import annotations

import torch
from torch import nn

HEADS = 8
HEAD_DIM = 64
NUM_LATENTS = 64
DEPTH = 6
FF_MULT = 4


class FeedForward(nn.Module):
    """LayerNorm, Linear x4 (no bias), GELU, Linear back (no bias)."""

    def __init__(self, dim: int, mult: int = FF_MULT):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, dim * mult, bias=False)
        self.down = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(self.norm(x))))


class PerceiverAttention(nn.Module):
    """Latents attend to [image tokens; latents]."""

    def __init__(self, dim: int):
        super().__init__()
        inner = HEADS * HEAD_DIM
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x [N, v, D] image tokens, latents [N, L, D] -> [N, L, D]."""
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = _heads(self.to_q(latents)) * HEAD_DIM**-0.5  # [N, h, L, d]
        k, v = (_heads(t) for t in self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1))  # [N, h, v+L, d]
        sim = q @ k.transpose(-1, -2)  # [N, h, L, v+L]
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = sim.softmax(dim=-1) @ v  # [N, h, L, d]
        return self.to_out(out.transpose(1, 2).flatten(2))


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attn = PerceiverAttention(dim)
        self.ff = FeedForward(dim)


class PerceiverResampler(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(NUM_LATENTS, dim))
        self.layers = nn.ModuleList(PerceiverLayer(dim) for _ in range(DEPTH))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, v, D] (N images' patch tokens) -> [N, 64, D]."""
        latents = self.latents.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer.attn(x, latents) + latents
            latents = layer.ff(latents) + latents
        return self.norm(latents)


def _heads(t: torch.Tensor) -> torch.Tensor:
    """[N, n, h*d] -> [N, h, n, d]."""
    return t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2)
