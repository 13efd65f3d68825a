"""The prefix that every prompt of a batch shares, found in the tokens and run once.

InfoScore's beam search scores, for one beam, dozens of prompts that differ only after the ICDs
the beam already holds: system turn, those ICDs' images and texts, then one candidate ICD and the
query. Those first tokens are the same in every row of such a batch, and a prefill that runs them
once, for one row, and runs each row's rest from a copy of that cache, does the same work for a
fraction of the cost.

Which prefix: the longest run of tokens that every row's real (unpadded) tokens start with, cut
back so that it ends outside an image's tokens and holds the same images (by file) in every row
-- equal token ids do not mean equal pictures -- and so that every row keeps at least its last
token for what follows the prefill.

The layout: a left-padded batch keeps its shape, with each row's first `length` real tokens moved
to the front, `[prefix | padding | rest]`. A model whose positions come from the attention mask
(rotary positions count the real tokens before each one; Qwen2.5-VL's 3D positions likewise skip
masked columns) then gives every real token the position it had in the plain layout, and the
keys and values are the plain prefill's up to float rounding. A model whose positions are the
column index (ALiBi) would see the padding as distance: it must not use this layout.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


def shared_prefix_length(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    is_image: torch.Tensor,
    images: Sequence[Sequence[Hashable]],
) -> int:
    """Tokens at the start of every row (real tokens only) that can be run once for the whole batch.

    `input_ids`, `attention_mask`, `is_image`: [B, L], left-padded; `images[b]`: row b's images in
    the order their tokens appear (anything comparable: paths). 0 when nothing is shared.
    """
    lengths = attention_mask.sum(dim=1).tolist()
    width = input_ids.shape[1]
    rows = [input_ids[b, width - n :] for b, n in enumerate(lengths)]
    kinds = [is_image[b, width - n :] for b, n in enumerate(lengths)]
    limit = min(lengths) - 1  # every row keeps its last token for what follows the prefill
    if limit <= 0:
        return 0
    first = rows[0][:limit]
    same = torch.ones(limit, dtype=torch.bool, device=input_ids.device)
    for row in rows[1:]:
        same &= row[:limit] == first
    differing = (~same).nonzero()
    length = int(differing[0]) if len(differing) else limit
    return _cut_at_images(kinds[0], length, images)


def _cut_at_images(kind: torch.Tensor, length: int, images: Sequence[Sequence[Hashable]]) -> int:
    """`length` cut back to the start of the first image it splits or that differs between rows."""
    flags = kind.tolist()
    image = 0
    start = 0
    while start < length:
        if not flags[start]:
            start += 1
            continue
        end = start
        while end < len(flags) and flags[end]:
            end += 1
        if end > length or len({tuple(row[image : image + 1]) for row in images}) != 1:
            return start
        image, start = image + 1, end
    return length


def images_in_prefix(is_image: torch.Tensor, length: int) -> int:
    """How many images' tokens lie in the first `length` columns of a prefix-first row."""
    flags = is_image[:length].tolist()
    return sum(1 for i, flag in enumerate(flags) if flag and (i == 0 or not flags[i - 1]))


def prefix_first(inputs: dict, keys: Sequence[str], length: int) -> dict:
    """`inputs` with, in every row of each of `keys` ([B, L] tensors), the first `length` real tokens
    moved to columns 0..length-1 and the left padding after them (see the module doc)."""
    mask = inputs["attention_mask"]
    width = mask.shape[1]
    pads = (width - mask.sum(dim=1)).tolist()
    columns = torch.arange(width, device=mask.device)
    order = []
    for pad in pads:
        # new column c < length <- old pad + c; length <= c < length + pad <- old c - length; then the same
        row = torch.where(
            columns < length, columns + pad, torch.where(columns < length + pad, columns - length, columns)
        )
        order.append(row)
    index = torch.stack(order)
    moved = dict(inputs)
    for key in keys:
        if key in inputs:
            moved[key] = inputs[key].gather(1, index)
    return moved
