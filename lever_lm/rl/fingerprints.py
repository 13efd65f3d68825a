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

from lever_lm.models.v3 import proposals
from lever_lm.rl.journal import fingerprint as fingerprint_of  # noqa: F401  (re-exported)
from lever_lm.vqa.backends import describe_settings

FORMAT_VERSION = 1
HASH_CHUNK = 1 << 22


def run_settings(request, proposal, proposal_block: int) -> dict:
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
        # The constants that fix which random numbers and float roundings a seed produces.
        "proposal_code": {
            "scan_chunk": proposals.SCAN_CHUNK,
            "draw_block": proposals.DRAW_BLOCK,
            "query_block": proposal_block,
        },
        "eval_mode": request.eval_mode,
        "vqa": describe_settings(request.vqa_model, model_path=request.vqa_model_path, config=request.config),
        "inputs": {name: file_digest(path) for name, path in inputs.items() if path is not None},
    }


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
