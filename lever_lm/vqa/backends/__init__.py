"""VQA backends by name: `load_backend("qwen2.5_vl_3B", model_path=..., device=..., config=...)`.

| name                    | model                                                                  |
|-------------------------|------------------------------------------------------------------------|
| `qwen2.5_vl_3B`         | Qwen/Qwen2.5-VL-3B-Instruct (or any Qwen2.5-VL dir); per-image work cached |
| `hf_image_text_to_text` | any chat VLM loadable with AutoModelForImageTextToText (needs a path)  |
| `flamingo_3B`           | OpenFlamingo-3B (CLIP ViT-L/14 + MPT-1B), the project's own port       |

Modules are imported on use, so listing the names (e.g. for `--help`) loads no model code.
Every backend module offers `load(...)` -> a `base.VQABackend` (`batch_size`, `generate(prompts)`)
and `describe_settings(...)`, what shapes its answers, for the journal fingerprint.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from lever_lm.digests import directory_digest, file_digest
from lever_lm.errors import InputError

BACKENDS = {
    "qwen2.5_vl_3B": "lever_lm.vqa.backends.qwen2_5_vl",
    "hf_image_text_to_text": "lever_lm.vqa.backends.image_text_to_text",
    "flamingo_3B": "lever_lm.vqa.backends.flamingo",
}


def available_backends() -> list[str]:
    return list(BACKENDS)


def _module(name: str):
    module_name = BACKENDS.get(name)
    if module_name is None:
        raise InputError(None, f"unknown --vqa_model {name!r}; choose one of: {', '.join(BACKENDS)}")
    return importlib.import_module(module_name)


def load_backend(
    name: str,
    *,
    model_path: str | None = None,
    device: str = "cpu",
    config: dict | None = None,
    batch_size: int | None = None,
):
    """Load the named backend; an unknown name or an unloadable model is an InputError, before any work.

    `model_path` wins over `config["vqa_model"]["path"]`; `batch_size` over `vqa_model.batch_size`.
    """
    return _module(name).load(name, model_path=model_path, device=device, config=config, batch_size=batch_size)


def describe_settings(name: str, *, model_path: str | None, config: dict, device: str) -> dict:
    """What shapes the named backend's answers, without loading the model: the model's identity by
    content, the prompt and decoding settings, and the numerics (device type, dtype, attention
    implementation, library versions). Each backend module describes itself."""
    return _module(name).describe_settings(name, model_path=model_path, config=config, device=device)


def model_identity(path: Path) -> dict:
    """A model file or directory identified by the sha256 of its content (every file of a directory:
    weights, config, tokenizer, processor, chat template). Digests are cached by file identity
    (`lever_lm.digests`), so an unchanged model is not hashed again at every start."""
    path = Path(path)
    return {"sha256": directory_digest(path) if path.is_dir() else file_digest(path)}
