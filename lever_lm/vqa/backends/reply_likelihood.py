"""Teacher-forced log-probabilities of replies, continuing from the prompts' prefill.

The prompts' KV cache comes from generation: `generate` leaves a cache of every row it ran (a
prompt's beams, each a copy of the prompt, then the generated tokens), which `prompt_cache` cuts
back to one row per prompt and the prompt but its last token (a cache whose layers do not keep
every position, e.g. sliding windows, cannot be: the backend then prefills the prompts once more,
without their last token). A reply's log-probability then needs only the reply: the prompt's last
token and the reply's tokens but the last go through the model, attending to the cached prompt,
and the log-probabilities of the reply's tokens, the end-of-turn token included, are summed
(natural log, computed in float32 from the model's logits).

All the replies of a batch are one batch of continuations: each reply is a row holding a copy of
its prompt's cache row, continuations are right-padded to the longest (the padding comes after
every real token, so causal attention keeps it out of the sums). To bound memory, at most
`max_rows` rows go through the model at once, shortest replies first, so that little is padding.

Positions come from the model's own rule for continuing from a cache, the one `generate` uses
(`_prepare_position_ids_for_generation`): for Qwen2.5-VL that is the 3D rotary position of a text
token after the images, from the offsets the model kept at the prefill. A model without that
rule gets the standard one, the count of attended tokens before each token.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers.cache_utils import DynamicLayer

# The inputs with one entry per prompt token: cut with the prompt, and all that `generate` needs
# once the images are in the cache.
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")


def reply_logprobs(
    model,
    cache,
    inputs: dict,
    rows: Sequence[tuple[int, tuple[int, ...]]],
    *,
    cache_argument: str,
    pad_token_id: int,
    max_rows: int,
) -> list[float]:
    """The log-probability of each (prompt row, reply tokens) of `rows`, in order.

    `inputs` are the batch's model inputs (the whole prompts, left-padded) and `cache` the
    prefill of `inputs` without their last column.
    """
    if not rows:
        return []
    positions = continuation_positions(model, inputs, cache, max(len(tokens) for _, tokens in rows))
    by_length = sorted(range(len(rows)), key=lambda i: len(rows[i][1]))  # chunks of like lengths pad little
    out = [0.0] * len(rows)
    for start in range(0, len(rows), max_rows):
        chunk = by_length[start : start + max_rows]
        scores = _score(model, cache, inputs, positions, [rows[i] for i in chunk], cache_argument, pad_token_id)
        for i, score in zip(chunk, scores):
            out[i] = score
    return out


def _score(model, cache, inputs, positions, chunk, cache_argument: str, pad_token_id: int) -> list[float]:
    device = inputs["input_ids"].device
    prompt_rows = torch.tensor([row for row, _ in chunk], device=device)
    width = max(len(tokens) for _, tokens in chunk)
    fed = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
    targets = torch.zeros((len(chunk), width), dtype=torch.long)
    real = torch.zeros((len(chunk), width), dtype=torch.bool)
    last_tokens = inputs["input_ids"][:, -1].tolist()
    for i, (row, tokens) in enumerate(chunk):
        fed[i, : len(tokens)] = torch.tensor([last_tokens[row], *tokens[:-1]])
        targets[i, : len(tokens)] = torch.tensor(tokens)
        real[i, : len(tokens)] = True
    fed, targets, real = fed.to(device), targets.to(device), real.to(device)
    prefix_mask = inputs["attention_mask"][:, :-1].index_select(0, prompt_rows)
    output = model(
        input_ids=fed,
        attention_mask=torch.cat([prefix_mask, real.to(prefix_mask.dtype)], dim=1),
        position_ids=positions.index_select(-2, prompt_rows)[..., :width],
        use_cache=True,
        **{cache_argument: select_cache_rows(cache, prompt_rows)},
    )
    logits = output.logits.float()
    token_logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return torch.where(real, token_logprobs, 0.0).double().sum(-1).tolist()


def continuation_positions(model, inputs: dict, cache, length: int) -> torch.Tensor:
    """The positions of `length` tokens that start at each prompt's last token, [..., batch, length]."""
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = length - 1
    extended_ids = torch.cat([input_ids, input_ids[:, -1:].expand(-1, extra)], dim=1)
    extended_mask = torch.cat([mask, mask.new_ones((mask.shape[0], extra))], dim=1)
    prepare = getattr(model, "_prepare_position_ids_for_generation", None)
    if prepare is None:
        positions = (extended_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        model_kwargs = {key: value for key, value in inputs.items() if key not in TEXT_KEYS}
        model_kwargs.update(input_ids=extended_ids, attention_mask=extended_mask, cache=cache, past_key_values=cache)
        for key in _TYPE_KEYS:  # the continuation is text
            if key in inputs:
                model_kwargs[key] = torch.cat([inputs[key], inputs[key].new_zeros((mask.shape[0], extra))], dim=1)
        positions = prepare(extended_ids, model_kwargs)
    return positions[..., -length:]


def prompt_cache(output, prompt_shape: torch.Size):
    """The cache `generate` returned (`return_dict_in_generate=True`), cut back to one row per prompt
    holding the prompt but its last token; None when it cannot be (no cache, or layers that do not
    keep every position, e.g. sliding windows: the caller then prefills)."""
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = getattr(output, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers or any(
        type(layer) is not DynamicLayer or not getattr(layer, "is_initialized", True) for layer in layers
    ):
        return None
    batch_size, prompt_length = prompt_shape
    rows = layers[0].keys.shape[0]
    extra = cache.get_seq_length() - (prompt_length - 1)  # the last prompt token and the generated ones
    if rows % batch_size or extra < 0:
        return None
    if extra:
        cache.crop(-extra)  # a negative count removes that many positions (in every transformers 5 version)
    cache.batch_select_indices(torch.arange(0, rows, rows // batch_size, device=layers[0].keys.device))
    return cache


def select_cache_rows(cache, rows: torch.Tensor):
    """A cache holding rows `rows` of `cache` (a row may repeat); `cache` itself is left as it was."""
    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    selected.batch_select_indices(rows)
    return selected
