"""Load a model directory's processor, with an image-only fallback for Qwen2-VL-style models.

In transformers 5 the Qwen2.5-VL processor also builds a video processor, and that one needs
torchvision. This project runs without torchvision (it does not import beside the pinned CPU
torch), and VQA prompts hold images only. So when `AutoProcessor` cannot be built, the same
Qwen2.5-VL processing code is used with the video part left out: the tokenizer, the PIL image
processor and the chat template, read from the same directory.
"""

from __future__ import annotations

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


def load_processor(model_dir: str | Path):
    """The processor of a local model directory (never the network)."""
    try:
        return AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except ImportError:
        # Only the torchvision-backed video processor is missing: rebuild without it.
        return load_image_only_qwen_processor(model_dir)


def load_image_only_qwen_processor(model_dir: str | Path) -> ImageOnlyQwen2_5_VLProcessor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir, local_files_only=True)
    chat_template = _read_chat_template(Path(model_dir)) or getattr(tokenizer, "chat_template", None)
    return ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def _read_chat_template(model_dir: Path) -> str | None:
    """The chat template as Hugging Face stores it: `chat_template.jinja` or `chat_template.json`."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = model_dir / "chat_template.json"
    if as_json.is_file():
        import json

        return json.loads(as_json.read_text(encoding="utf-8")).get("chat_template")
    return None
