"""`--vqa_model flamingo_3B` (OpenFlamingo-3B): not runnable in this project; fails at once, saying why.

OpenFlamingo-3B (`openflamingo/OpenFlamingo-3B-vitl-mpt1b`) is a CLIP ViT-L/14 vision encoder and
MPT-1B joined by gated cross-attention. Running it needs the `open_flamingo` package, `open_clip`
and MPT-1B's remote modelling code, all written against transformers 4.x; this project requires
transformers 5, where that remote code no longer loads. Rather than fall back to another model
silently, loading stops before any work with this explanation. The OpenFlamingo prompt form
(`<image>Question:{q} Short answer:{a}<|endofchunk|>` per ICD, docs/formats.md §5) is implemented in
`lever_lm.vqa.prompts.flamingo_text` with its defaults in `model_config.FLAMINGO_TEMPLATE`, ready
for a backend in an environment that can run the model.
"""

from __future__ import annotations

from lever_lm.errors import InputError

NAME = "flamingo_3B"
UNSUPPORTED = (
    "--vqa_model flamingo_3B (OpenFlamingo-3B: CLIP ViT-L/14 + MPT-1B) is not supported here: it needs the "
    "open_flamingo package, open_clip and MPT-1B's remote model code, which are written for transformers 4.x "
    "and do not run with transformers 5, which this project requires. Use --vqa_model qwen2.5_vl_3B, or "
    "--vqa_model hf_image_text_to_text with --vqa_model_path for another chat VLM."
)


def load(name: str = NAME, **_ignored) -> None:
    """Always an InputError (see the module doc)."""
    raise InputError(None, UNSUPPORTED)


def describe_settings(name: str = NAME, **_ignored) -> dict:
    """Always an InputError (see the module doc)."""
    raise InputError(None, UNSUPPORTED)
