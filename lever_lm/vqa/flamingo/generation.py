"""`generate` for OpenFlamingo: the model behind transformers' `GenerationMixin`, so decoding (greedy,
beam search, any `GenerationConfig` setting) is the same code the chat backends use.

The adapter only forwards: `media` and `media_mask` travel as model keyword arguments (`generate`
repeats them per beam), the `FlamingoCache` holds keys, values and each row's `<image>` count.
End of answer is `<|endofchunk|>`, as in OpenFlamingo's own `generate`.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from lever_lm.vqa.flamingo.model import FlamingoCache, OpenFlamingo

# transformers 5 renamed the cache argument from `past_key_values` to `cache` (output field too)
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class FlamingoGenerationConfig(PretrainedConfig):
    model_type = "lever_lm_openflamingo"

    def __init__(self, vocab_size: int = 0, num_hidden_layers: int = 0, **kwargs):
        self.vocab_size = vocab_size
        self.num_hidden_layers = num_hidden_layers
        super().__init__(**kwargs)


class FlamingoForGeneration(PreTrainedModel, GenerationMixin):
    config_class = FlamingoGenerationConfig
    main_input_name = "input_ids"

    def __init__(self, model: OpenFlamingo, eoc_token_id: int, pad_token_id: int):
        config = FlamingoGenerationConfig(
            vocab_size=model.lang_model.transformer["wte"].num_embeddings,
            num_hidden_layers=model.lang_model.config.n_layers,
            eos_token_id=eoc_token_id,
            pad_token_id=pad_token_id,
        )
        super().__init__(config)
        self.model = model
        self.generation_config.eos_token_id = eoc_token_id
        self.generation_config.pad_token_id = pad_token_id

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """No plain `DynamicCache` from `generate`: `forward` makes the `FlamingoCache` it needs."""
        return False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        media: torch.Tensor | None = None,
        media_mask: torch.Tensor | None = None,
        cache: FlamingoCache | None = None,
        past_key_values: FlamingoCache | None = None,
        use_cache: bool = True,
        **_generation_extras,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = FlamingoCache()
        if attention_mask is None:  # `generate` leaves it out when nothing is padded
            past = cache.get_seq_length() if cache is not None else 0
            attention_mask = torch.ones(
                input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long, device=input_ids.device
            )
        logits = self.model(input_ids, attention_mask, media, media_mask, cache)
        return CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: cache})
