"""What a run's journal is keyed by: the settings and inputs that shape its result.

In: every proposal setting, the scoring mode, the VQA model's identity and prompt/decoding
settings (without loading it), and a content hash of every input file. Out: the device, batch
sizes, shard layout, --limit and paths as such -- they change how the work is done, not what it
produces -- so a run moved to another GPU, or resumed with a bigger batch, picks up its journal.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

from lever_lm.errors import InputError
from lever_lm.rl.journal import fingerprint as fingerprint_of  # noqa: F401  (re-exported)
from lever_lm.vqa.backends import load_backend
from lever_lm.vqa.backends.image_text_to_text import check_model_dir
from lever_lm.vqa.backends.qwen2_5_vl import resolve_model_path
from lever_lm.vqa.model_config import resolve_settings

FORMAT_VERSION = 1
HASH_CHUNK = 1 << 22


def run_settings(request, proposal) -> dict:
    """The JSON-serialisable settings dict whose hash names the journal directory."""
    paths = request.dataset
    inputs = {
        "sft_ckpt": request.sft_ckpt,
        "beam_data": request.beam_data,
        "query_emb": request.query_emb,
        "cand_emb": request.cand_emb,
        "train_questions": paths.train_ques_path,
        "train_annotations": paths.train_ann_path,
        "val_questions": request.val_ques_path,
        "val_annotations": request.val_ann_path,
    }
    return {
        "format_version": FORMAT_VERSION,
        "proposal": {**asdict(proposal), "temps": list(proposal.temps)},
        "eval_mode": request.eval_mode,
        "vqa": describe_vqa_settings(request.vqa_model, model_path=request.vqa_model_path, config=request.config),
        "inputs": {name: file_digest(path) for name, path in inputs.items() if path is not None},
    }


def file_digest(path: Path) -> str:
    """sha256 of a file's content (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_vqa_settings(name: str, *, model_path: str | None, config: dict) -> dict:
    """The VQA model's identity and prompt/decoding settings, without loading the model.

    Device-dependent choices (dtype, batch size) are left out on purpose.
    """
    if name not in ("qwen2.5_vl_3B", "hf_image_text_to_text"):
        load_backend(name, model_path=model_path, config=config)  # unknown or unsupported: its InputError
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
    and size (hashing gigabytes of weights at every start would cost more than it protects)."""
    weights = sorted(p for pattern in ("*.safetensors", "*.bin") for p in path.glob(pattern))
    return {
        "config_sha256": file_digest(path / "config.json"),
        "weights": {p.name: p.stat().st_size for p in weights},
    }
