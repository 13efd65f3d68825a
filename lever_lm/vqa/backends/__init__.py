"""VQA backends by name: `load_backend("qwen2.5_vl_3B", model_path=..., device=..., config=...)`.

| name                    | model                                                                  |
|-------------------------|------------------------------------------------------------------------|
| `qwen2.5_vl_3B`         | Qwen/Qwen2.5-VL-3B-Instruct (or any Qwen2.5-VL dir); per-image work cached |
| `hf_image_text_to_text` | any chat VLM loadable with AutoModelForImageTextToText (needs a path)  |
| `flamingo_3B`           | OpenFlamingo-3B: not runnable with transformers 5, fails with the reason |

Modules are imported on use, so listing the names (e.g. for `--help`) loads no model code.
Every backend offers `generate(prompts) -> list[Generation]` and `describe()` (see `base`).
"""

from __future__ import annotations

import importlib

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
