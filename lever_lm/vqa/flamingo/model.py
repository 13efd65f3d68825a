"""OpenFlamingo: CLIP vision tower -> perceiver resampler -> MPT with gated cross-attention before every block.

    image [3, 224, 224] --CLIP ViT-L/14--> 256 patch tokens [256, 1024] --perceiver--> media [64, 1024]
    text ids [B, S] --wte--> x; for each layer: x = xattn(x, media of the latest <image>); x = MPT block(x)
    --ln_f, tied wte--> logits [B, S, V]

The vision tokens are CLIP's last hidden state without its class token and without the final
LayerNorm (`ln_post` touches only the pooled output): what open_clip's `visual` returns as tokens
with `output_tokens=True`. Images are encoded on their own (`encode_images`), so a caller can cache
media per image and hand the latents of each prompt's images to `forward`.

Which image a text token attends to is its "text time": the number of `<image>` tokens up to and
including it. The cache carries each row's count of `<image>` tokens already read, so tokens fed
later (generation steps) continue the count and attend to the prompt's last image, as in the
original, where generated tokens attend to the last image of the prompt. (Should a model ever
generate `<image>` itself, the tokens after it attend to nothing, as no latents exist for it; the
original's behaviour there is an accident of its caching and is not reproduced.)
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from lever_lm.vqa.flamingo.cross_attention import GatedCrossAttentionBlock
from lever_lm.vqa.flamingo.mpt import MPT, MPTConfig
from lever_lm.vqa.flamingo.perceiver import PerceiverResampler


class FlamingoCache(DynamicCache):
    """MPT's keys and values, plus how many `<image>` tokens each row has read (`media_seen`, [B])."""

    def __init__(self):
        super().__init__()
        self.media_seen: torch.Tensor | None = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.media_seen is not None:
            self.media_seen = self.media_seen.index_select(0, beam_idx.to(self.media_seen.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.media_seen is not None:
            self.media_seen = self.media_seen.repeat_interleave(repeats, dim=0)


class OpenFlamingo(nn.Module):
    def __init__(self, vision_encoder: nn.Module, mpt_config: MPTConfig, vocab_rows: int, media_token_id: int):
        super().__init__()
        vis_dim = vision_encoder.config.hidden_size
        self.media_token_id = media_token_id
        self.vision_encoder = vision_encoder  # transformers' CLIPVisionModel
        self.perceiver = PerceiverResampler(vis_dim)
        self.lang_model = MPT(mpt_config, vocab_rows)
        self.cross_attn = nn.ModuleList(
            GatedCrossAttentionBlock(mpt_config.d_model, vis_dim) for _ in range(mpt_config.n_layers)
        )

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, H, W] -> media [N, 64, Dv]: CLIP patch tokens, resampled."""
        hidden = self.vision_encoder(pixel_values=pixels).last_hidden_state  # [N, 1 + patches, Dv]
        return self.perceiver(hidden[:, 1:])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: torch.Tensor,
        media_mask: torch.Tensor,
        cache: FlamingoCache | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, V] of `input_ids` [B, S] after the cached tokens.

        attention_mask [B, K]: real (1) / left padding (0) over cached + new tokens;
        media [B, T, 64, Dv] and media_mask [B, T]: each row's images in prompt order, padded to T.
        """
        text_time = (input_ids == self.media_token_id).long().cumsum(dim=1)  # [B, S]
        if cache is not None:
            if cache.media_seen is not None:
                text_time = text_time + cache.media_seen[:, None]
            cache.media_seen = text_time[:, -1]
        x = self.lang_model.embed(input_ids)
        bias = self.lang_model.attention_bias(attention_mask, input_ids.shape[1], x.dtype)
        blocks = self.lang_model.transformer["blocks"]
        for layer, (cross_attn, block) in enumerate(zip(self.cross_attn, blocks)):
            x = cross_attn(x, media, media_mask, text_time)
            x = block(x, bias, cache, layer)
        return self.lang_model.logits(x)
