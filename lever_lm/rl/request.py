"""What a generation run was asked to do: `GenerationRequest`, with the checks that need no file read.

`JobOptions` holds what every per-query job shares (the VQA model, device, batch size, shards,
journal, engine); the InfoScore beam data request builds on it too (`check_job_options`).

The command line (`lever_lm.rl.cli`) and the tests build a request; `check_request` refuses a bad
setting or an output path that cannot be written before any input is read, so nothing is computed
for a run that could never write its result. The request's field defaults are the command line's
defaults (the parser reads them from here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lever_lm.data.dataset_paths import DatasetPaths
from lever_lm.errors import InputError
from lever_lm.models.v3.pools import PoolSettings
from lever_lm.models.v3.proposals import ProposalSettings
from lever_lm.vqa.backends.base import resolve_device
from lever_lm.vqa.metric import MODES

ENGINES = ("local", "ray")
PROPOSAL_BLOCK = 32  # queries proposed together: the unit of sharding and of the engines' scheduling


@dataclass(frozen=True, kw_only=True)
class JobOptions:
    """What every per-query job on a VQA backend takes besides its inputs (the RL data generator, the
    InfoScore beam search): the model, where it runs, and how the work is split, journaled and
    executed. Shards, limit, journal, engine and progress never change a result."""

    vqa_model: str = "qwen2.5_vl_3B"
    vqa_model_path: str | None = None
    config: dict = field(default_factory=dict)
    config_path: Path | None = None
    device: str = "cuda:0"
    batch_size: int | None = None  # None: the VQA model's (vqa_model.batch_size, 16)
    num_shards: int = 1
    shard_id: int = 0
    limit: int | None = None
    journal_dir: Path | None = None
    merge_only: bool = False
    progress: bool = True
    engine: str = "local"  # local | ray (lever_lm.rl.engines); never part of the fingerprint
    ray_address: str | None = None  # None: start Ray here; "auto", HOST:PORT or ray://HOST:PORT: join a cluster
    num_workers: int | None = None  # None: every GPU of the Ray cluster on CUDA, else 1
    gpus_per_worker: float | None = None  # None: 1 on CUDA, 0 on CPU; fractions pack small models

    def journal_root(self) -> Path:
        return self.journal_dir or self.output_path.with_name(self.output_path.name + ".journal")


@dataclass(frozen=True)
class GenerationRequest(JobOptions):
    """Everything the command line (or a stage) decided; paths not yet checked."""

    sft_ckpt: Path
    beam_data: Path
    output_path: Path
    query_emb: Path
    cand_emb: Path
    dataset: DatasetPaths
    val_ques_path: Path | None = None
    val_ann_path: Path | None = None
    proposal: ProposalSettings = ProposalSettings()
    pools: PoolSettings = PoolSettings()
    shot_num: int | None = None  # None: from the beam data (overrides proposal.shot_num)
    proposal_block: int = PROPOSAL_BLOCK  # shapes the pointer's float rounding: part of the fingerprint
    eval_mode: str = "always"
    gt_prob: bool = True  # vqa_gt_prob: the likelihood of each human answer (off: the field is null)


def check_request(request: GenerationRequest) -> None:
    """Refuse settings and output locations that cannot work, before anything is read or computed."""
    if request.shot_num is not None and request.shot_num < 1:
        raise InputError(None, f"--shot_num must be >= 1 (got {request.shot_num})")
    if request.proposal_block < 1:
        raise InputError(None, f"--proposal_block must be >= 1 (got {request.proposal_block})")
    if (request.val_ques_path is None) != (request.val_ann_path is None):
        raise InputError(None, "give both --val_ques_path and --val_ann_path, or neither")
    if request.eval_mode not in MODES:
        raise InputError(None, f"--eval_mode must be one of {', '.join(MODES)}")
    check_job_options(request)


def check_job_options(request: JobOptions) -> None:
    """The checks every job's options need: shards, limit, batch size, engine, the output and journal
    locations, and the device (before anything is written)."""
    if request.num_shards < 1 or not 0 <= request.shard_id < request.num_shards:
        raise InputError(None, f"--shard_id must be in 0..{request.num_shards - 1} (got {request.shard_id})")
    if request.limit is not None and request.limit < 1:
        raise InputError(None, f"--limit must be >= 1 (got {request.limit})")
    if request.batch_size is not None and request.batch_size < 1:
        raise InputError(None, f"--batch_size must be >= 1 (got {request.batch_size})")
    _check_engine(request)
    check_output_location(request.output_path, request.journal_root())
    if not request.merge_only and request.engine == "local":
        resolve_device(request.device)  # a missing GPU is reported before anything is written


def _check_engine(request: JobOptions) -> None:
    """The engine flags; the Ray cluster itself (address, GPUs) is checked when the engine connects."""
    if request.engine not in ENGINES:
        raise InputError(None, f"--engine must be one of {', '.join(ENGINES)} (got {request.engine!r})")
    ray_flags = {"--ray_address": request.ray_address, "--num_workers": request.num_workers,
                 "--gpus_per_worker": request.gpus_per_worker}  # fmt: skip
    given = [flag for flag, value in ray_flags.items() if value is not None]
    if request.engine != "ray" and given:
        raise InputError(None, f"{', '.join(given)} only apply with --engine ray")
    if request.num_workers is not None and request.num_workers < 1:
        raise InputError(None, f"--num_workers must be >= 1 (got {request.num_workers})")
    gpus = request.gpus_per_worker
    if gpus is not None and (gpus < 0 or (gpus > 1 and gpus != int(gpus))):
        raise InputError(None, f"--gpus_per_worker must be a fraction in [0, 1] or a whole number (got {gpus:g})")
    if gpus == 0 and request.device.startswith("cuda"):
        raise InputError(None, f"--gpus_per_worker 0 with --device {request.device}: the workers would see no GPU")


def check_output_location(output_path: Path, journal_root: Path) -> None:
    """The output must be a writable file path and the journal root a directory (or creatable)."""
    if output_path.is_dir():
        raise InputError(output_path, "--output_path is a directory; give the path of the JSON file to write")
    _check_writable_directory(output_path.parent, output_path)
    if journal_root.exists() and not journal_root.is_dir():
        raise InputError(journal_root, "the journal directory (--journal_dir) is a file, not a directory")
    _check_writable_directory(journal_root if journal_root.exists() else journal_root.parent, journal_root)


def _check_writable_directory(directory: Path, for_path: Path) -> None:
    """`directory` (or its nearest existing ancestor) is a directory this process may write in."""
    existing = directory
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(for_path, f"cannot create it: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(for_path, f"cannot write there: no write permission in {existing}")
