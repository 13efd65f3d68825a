"""Load a model directory's processor; Qwen2-VL-family models always get the image-only PIL processor.

In transformers 5 the Qwen2.5-VL processor also builds a video processor, and that one needs
torchvision. This project runs without torchvision (it does not import beside the pinned CPU
torch), and VQA prompts hold images only. So Qwen2-VL-family models are processed by the same
Qwen2.5-VL processing code with the video part left out: the tokenizer, the PIL image processor
and the chat template, read from the same directory. Always the PIL one, even where torchvision
is installed (where `AutoProcessor` would pick the torchvision image processor, whose resizing
rounds differently): the pixels, hence the answers, must not depend on what else is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video processor: same image tokens, same chat template."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


IMAGE_PROCESSOR = Qwen2VLImageProcessorPil.__name__  # what Qwen2-VL-family models are processed with
QWEN_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def load_processor(model_dir: str | Path):
    """The processor of a local model directory (never the network)."""
    if _model_type(Path(model_dir)) in QWEN_MODEL_TYPES:
        return load_image_only_qwen_processor(model_dir)
    return AutoProcessor.from_pretrained(model_dir, local_files_only=True)


def _model_type(model_dir: Path) -> str | None:
    try:
        return json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None  # AutoProcessor reports what is wrong with the directory


def load_image_only_qwen_processor(model_dir: str | Path) -> ImageOnlyQwen2_5_VLProcessor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir, local_files_only=True)
    chat_template = _read_chat_template(Path(model_dir)) or getattr(tokenizer, "chat_template", None)
    return ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
    )


def _read_chat_template(model_dir: Path) -> str | None:
    """The chat template as Hugging Face stores it: `chat_template.jinja` or `chat_template.json`."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = model_dir / "chat_template.json"
    if as_json.is_file():
        return json.loads(as_json.read_text(encoding="utf-8")).get("chat_template")
    return None
