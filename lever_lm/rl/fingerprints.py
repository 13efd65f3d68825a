"""What a run's journal is keyed by: everything that shapes its result, identified by content.

In: every proposal setting and the proposal block size; the pool settings (and the sampler
cache's content) with per-query pools; the scoring mode; the VQA model's content,
prompt, decoding and numerics (device type, dtype, attention implementation, library versions);
the content of every input file, of the images the data set shows, and of the project code that
computes a result. Out: the device index, batch sizes, the shard layout, --limit and paths as
such -- they change how the work is done, not what it produces -- so a run moved to another GPU
of the same kind, or resumed with a bigger batch, picks up its journal.

The content digests are cached by file identity (`lever_lm.digests`): an unchanged input is not
read again at the next start.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import lever_lm
from lever_lm.digests import file_digest, files_digest
from lever_lm.models.v3 import proposals
from lever_lm.rl.inputs import Inputs
from lever_lm.rl.request import GenerationRequest
from lever_lm.vqa.backends import describe_settings

FINGERPRINT_LENGTH = 16
FORMAT_VERSION = 2
# The project code whose edits change what a run computes (packages, and single modules of rl/).
RESULT_CODE = ("data", "models", "vqa", "rl/blocks.py", "rl/inputs.py", "rl/records.py")


def fingerprint(settings: dict) -> str:
    """A short stable hash of a JSON-serialisable settings dict (key order does not matter)."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:FINGERPRINT_LENGTH]


def run_settings(request: GenerationRequest, inputs: Inputs) -> dict:
    """The JSON-serialisable settings dict whose hash names the journal directory."""
    paths = request.dataset
    files = {
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
        "proposal": {**asdict(inputs.proposal), "temps": list(inputs.proposal.temps)},
        "pool": pool_settings(request),
        # The constants that fix which random numbers and float roundings a seed produces.
        "proposal_code": {
            "scan_chunk": proposals.SCAN_CHUNK,
            "draw_block": proposals.DRAW_BLOCK,
            "query_block": request.proposal_block,
        },
        "eval_mode": request.eval_mode,
        "gt_prob": request.gt_prob,
        "vqa": describe_settings(
            request.vqa_model, model_path=request.vqa_model_path, config=request.config, device=request.device
        ),
        "inputs": {name: file_digest(path) for name, path in files.items() if path is not None},
        "images": files_digest(inputs.dataset.image_names(), paths.train_image_root),
        "code": code_digest(),
    }


def pool_settings(request: GenerationRequest) -> dict:
    """The pool settings that shape the result; a sampler cache by its content, when it is used."""
    settings = request.pools.describe()
    if request.pools.per_query and request.pools.sampler == "cache":
        settings["sampler_cache"] = file_digest(request.pools.sampler_cache)
    return settings


def code_digest(parts: Sequence[str] = RESULT_CODE) -> str:
    """The content of the project code that shapes a job's results (packages and modules under
    lever_lm/; by default the RL job's, RESULT_CODE)."""
    root = Path(lever_lm.__file__).parent
    sources = [p for part in parts for p in ((root / part).rglob("*.py") if (root / part).is_dir() else [root / part])]
    return files_digest(sources, root)


def matched_summary(settings: dict) -> str:
    """What a reused journal matched, for the log: the model and input digests, short."""
    short = {name: digest[:12] for name, digest in settings["inputs"].items()}
    model = settings["vqa"]["model"].get("sha256", "?")[:12]
    return f"model {model}, images {settings['images'][:12]}, code {settings['code'][:12]}, inputs {short}"
