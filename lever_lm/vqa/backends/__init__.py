"""VQA backends by name: `load_backend("qwen2.5_vl_3B", model_path=..., device=..., config=...)`.

| name                    | model                                                                  |
|-------------------------|------------------------------------------------------------------------|
| `qwen2.5_vl_3B`         | Qwen/Qwen2.5-VL-3B-Instruct (or any Qwen2.5-VL dir); per-image work cached |
| `hf_image_text_to_text` | any chat VLM loadable with AutoModelForImageTextToText (needs a path)  |
| `flamingo_3B`           | OpenFlamingo-3B (CLIP ViT-L/14 + MPT-1B), the project's own port       |

Modules are imported on use, so listing the names (e.g. for `--help`) loads no model code.
Every backend offers `generate(prompts) -> list[Generation]` and `describe()` (see `base`).
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import asdict
from pathlib import Path

from lever_lm.errors import InputError

BACKENDS = {
    "qwen2.5_vl_3B": "lever_lm.vqa.backends.qwen2_5_vl",
    "hf_image_text_to_text": "lever_lm.vqa.backends.image_text_to_text",
    "flamingo_3B": "lever_lm.vqa.backends.flamingo",
}


def available_backends() -> list[str]:
    return list(BACKENDS)


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
    module_name = BACKENDS.get(name)
    if module_name is None:
        raise InputError(None, f"unknown --vqa_model {name!r}; choose one of: {', '.join(BACKENDS)}")
    module = importlib.import_module(module_name)
    return module.load(name, model_path=model_path, device=device, config=config, batch_size=batch_size)


def describe_settings(name: str, *, model_path: str | None, config: dict) -> dict:
    """The VQA model's identity and prompt/decoding settings, without loading the model.

    Device-dependent choices (dtype, batch size) are left out on purpose.
    """
    if name == "flamingo_3B":
        from lever_lm.vqa.backends.flamingo import describe_settings as describe_flamingo

        return describe_flamingo(name, model_path=model_path, config=config)
    if name not in ("qwen2.5_vl_3B", "hf_image_text_to_text"):
        load_backend(name, model_path=model_path, config=config)  # unknown or unsupported: its InputError
    from lever_lm.vqa.backends.image_text_to_text import check_model_dir
    from lever_lm.vqa.backends.qwen2_5_vl import resolve_model_path
    from lever_lm.vqa.model_config import resolve_settings

    settings = resolve_settings("chat", config, model_path=model_path)
    if name == "qwen2.5_vl_3B":
        path = resolve_model_path(settings.path)
    elif settings.path:
        path = Path(settings.path)
    else:
        raise InputError(None, f"--vqa_model {name} needs --vqa_model_path (or vqa_model.path in the config)")
    check_model_dir(path)
    return {
        "vqa_model": name,
        "model": model_identity(path),
        "prompt": asdict(settings.prompt),
        "generation": dict(settings.generation),
        "processor_kwargs": dict(settings.processor_kwargs),
    }


def model_identity(path: Path) -> dict:
    """What identifies a model directory's weights cheaply: its config, and each weight file's name
    and size (hashing gigabytes of weights at every start would cost more than it protects).
    A single weight file (e.g. OpenFlamingo's checkpoint.pt): its name and size."""
    if path.is_file():
        return {"weights": {path.name: path.stat().st_size}}
    weights = sorted(p for pattern in ("*.safetensors", "*.bin") for p in path.glob(pattern))
    return {
        "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
        "weights": {p.name: p.stat().st_size for p in weights},
    }
