"""Gated cross-attention: before every MPT block, each text token looks at the image it follows.

OpenFlamingo's text tokens attend only to the latents of the most recent `<image>` before them
(a token's "text time" is how many `<image>` tokens precede it, itself included); a token with no
image before it gets no cross-attention at all. The result enters the residual stream through a
tanh gate, and so does a feed-forward. Sizes are the original's fixed ones: 8 heads of 64,
feed-forward x4.
"""

from __future__ import annotations

import torch
from torch import nn

from lever_lm.vqa.flamingo.perceiver import HEAD_DIM, HEADS, FeedForward


class MaskedCrossAttention(nn.Module):
    def __init__(self, dim: int, dim_visual: int):
        super().__init__()
        inner = HEADS * HEAD_DIM
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(
        self, x: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor, text_time: torch.Tensor
    ) -> torch.Tensor:
        """x [B, S, D]; media [B, T, n, Dv] latents of each row's images (padded to T);
        media_mask [B, T] real images; text_time [B, S] 1-based image index per token (0: none)."""
        _, T, n, _ = media.shape
        q = self.to_q(self.norm(x)).unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) * HEAD_DIM**-0.5  # [B,h,S,d]
        k, v = self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)  # [B, T*n, h*d] each
        k, v = (t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) for t in (k, v))  # [B, h, T*n, d]
        sim = q @ k.transpose(-1, -2)  # [B, h, S, T*n]
        media_time = torch.arange(1, T + 1, device=x.device).repeat_interleave(n)  # [T*n]
        real = media_mask.repeat_interleave(n, dim=1)  # [B, T*n]
        allowed = (text_time[:, :, None] == media_time) & real[:, None, :]  # [B, S, T*n]
        sim = sim.masked_fill(~allowed[:, None], -torch.finfo(sim.dtype).max)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        attn = sim.softmax(dim=-1).masked_fill(~allowed.any(dim=-1)[:, None, :, None], 0.0)  # no image: nothing
        return self.to_out((attn @ v).transpose(1, 2).flatten(2))  # [B, S, D]


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, dim_visual: int):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, x: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor, text_time: torch.Tensor
    ) -> torch.Tensor:
        x = self.attn(x, media, media_mask, text_time) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x
