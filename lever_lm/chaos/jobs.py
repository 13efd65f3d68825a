"""The resumable jobs the chaos driver knows: how to run one, where its journal grows, what it writes.

A new resumable stage needs one `Job`: its command for a run directory, the glob of its journal
inside that directory, and its final outputs (written with `lever_lm.io.atomic_output`, in the
order it writes them), each with what must equal an uninterrupted run's: the bytes, or for a
sidecar that also records the run itself, everything but that record (`json_except`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

GENERATOR = [sys.executable, "-m", "lever_lm.models.v3.generate_rl_data"]
BEAM_DATA = [sys.executable, "-m", "lever_lm.infoscore.cli"]
# The demo's smallest proposal set (2 beams, 1 sample at T=1.0, 1 random: 4 candidates a query), on the CPU.
SMALLEST = ["--num_beams", "2", "--temps", "1.0", "--num_samples_per_temp", "1", "--num_random", "1"]
RAY_WORKERS = 2
RAY_BLOCK = 2  # queries per proposal block with Ray: several blocks, so that both workers have work
# The generator's sidecar fields that describe the process that wrote the file, not the file: its timing,
# the Ray engine's workers, when it was written, and the batch size of the last run (null when that
# run only rewrote the file from a finished journal).
GENERATOR_RUN_RECORD = ("timing", "engine", "run.created", "run.batch_size")
_RAY_WORKER_READY = re.compile(r"Ray worker (\d+) ready on .*?: pid (\d+)")
_RAY_CLUSTER = """
import sys, ray
ray.init(address="local", num_cpus=int(sys.argv[2]), include_dashboard=False, _temp_dir=sys.argv[1])
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the chaos run closes our stdin
ray.shutdown()
"""
_ONE_THREAD_OFFLINE = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# A cluster started here, for jobs on this machine: no token between its drivers and it.
_LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


def file_bytes(path: Path, run_dir: Path) -> bytes:
    return path.read_bytes()


def json_except(*dotted: str) -> Callable[[Path, Path], object]:
    """A JSON file without the keys named (`a.b` for nested ones), its run directory written as `<run>`."""

    def compare(path: Path, run_dir: Path) -> object:
        data = json.loads(path.read_text(encoding="utf-8").replace(json.dumps(str(run_dir))[1:-1], "<run>"))
        for name in dotted:
            *parents, last = name.split(".")
            node = data
            for parent in parents:
                node = node.get(parent) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(last, None)
        return data

    return compare


@dataclass(frozen=True)
class Output:
    """A final output, relative to the run directory, and what of it must equal the uninterrupted run's."""

    path: str
    compare: Callable[[Path, Path], object] = file_bytes


@dataclass(frozen=True)
class Job:
    """A resumable job: run in a directory of its own, killed, restarted, and its outputs compared."""

    name: str
    command: Callable[[Path], list[str]]  # the command of a run writing into this directory
    journal: str  # glob of its journal file, relative to the run directory
    outputs: tuple[Output, ...]  # in the order the job writes them
    env: Mapping[str, str] = field(default_factory=dict)
    # Worker processes the job's log announces (number -> pid), for jobs that have any: they are killed too.
    workers: Callable[[str], dict[int, int]] | None = None
    timeout: float = 900.0  # seconds one process of the job may run


def ray_workers(log: str) -> dict[int, int]:
    """The Ray engine's workers, from its log lines `Ray worker N ready on HOST: pid P, ...`."""
    return {int(number): int(pid) for number, pid in _RAY_WORKER_READY.findall(log)}


def generator_job(name: str, flags: Sequence[str], engine: str = "local", ray_address: str | None = None) -> Job:
    """The RL generator (`generate_rl_data`) with `flags` (inputs and settings), writing `rl.json`.

    One torch thread in every process: the Ray workers' count, so both engines write the same bytes,
    and the fast setting on a shared CPU.
    """
    output = "rl.json"
    extra = ["--engine", "ray", "--num_workers", str(RAY_WORKERS), "--proposal_block", str(RAY_BLOCK)]
    if ray_address:
        extra += ["--ray_address", ray_address]
    engine_flags = extra if engine == "ray" else []
    env = _ONE_THREAD_OFFLINE
    return Job(
        name=name,
        command=lambda run_dir: [*GENERATOR, *flags, *engine_flags, "--output_path", str(run_dir / output)],
        journal=f"{output}.journal/*/shard-0-of-1.jsonl",
        outputs=(Output(output), Output(f"{output}.meta.json", json_except(*GENERATOR_RUN_RECORD))),
        env={**env, **_LOCAL_RAY_ENV} if engine == "ray" and ray_address else env,
        workers=ray_workers if engine == "ray" else None,
    )


def beam_data_job(name: str, flags: Sequence[str]) -> Job:
    """The InfoScore beam data stage (`lever_lm.infoscore.cli`) with `flags`, writing `beam.json`, on the local
    engine with one torch thread. Its sidecar records the process as the generator's does."""
    output = "beam.json"
    return Job(
        name=name,
        command=lambda run_dir: [*BEAM_DATA, *flags, "--output_path", str(run_dir / output)],
        journal=f"{output}.journal/*/shard-0-of-1.jsonl",
        outputs=(Output(output), Output(f"{output}.meta.json", json_except(*GENERATOR_RUN_RECORD))),
        env=_ONE_THREAD_OFFLINE,
    )


@contextlib.contextmanager
def local_ray_cluster(num_cpus: int = RAY_WORKERS) -> Iterator[str]:
    """A Ray cluster on this machine, in a process of its own, for the Ray jobs of a chaos run to join
    (`generator_job(..., ray_address=address)`): started once instead of by every run. It outlives
    the killed drivers, as a real cluster does, and is stopped (its session files removed) after."""
    sessions = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths live under it
    process = subprocess.Popen(
        [sys.executable, "-c", _RAY_CLUSTER, sessions, str(num_cpus)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, **_LOCAL_RAY_ENV},
        text=True,
    )
    try:
        address = process.stdout.readline().strip()
        if not re.fullmatch(r"[\d.]+:\d+", address):
            raise RuntimeError(f"the local Ray cluster did not start (it said {address!r})")
        yield address
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(sessions, ignore_errors=True)


def generator_flags(
    sft_ckpt: Path,
    beam_data: Path,
    query_emb: Path,
    cand_emb: Path,
    vqa_model_path: Path,
    vqa_root: Path,
    limit: int | None = None,
) -> list[str]:
    """The generator's flags for these inputs, a data set in the demo's layout under `vqa_root`, the
    smallest proposal set, the CPU, no progress bar."""
    flags = [
        "--sft_ckpt", str(sft_ckpt), "--beam_data", str(beam_data),
        "--query_emb", str(query_emb), "--cand_emb", str(cand_emb), "--vqa_model_path", str(vqa_model_path),
        "--train_ques_path", str(vqa_root / "OpenEnded_mscoco_train2014_questions.json"),
        "--train_ann_path", str(vqa_root / "mscoco_train2014_annotations.json"),
        "--train_image_root", str(vqa_root / "mscoco2014" / "train2014"),
        *SMALLEST, "--device", "cpu", "--no_progress",
    ]  # fmt: skip
    return flags + (["--limit", str(limit)] if limit else [])


def demo_generator_flags(demo: Path, beam_data: Path, sft_ckpt: Path, limit: int | None = None) -> list[str]:
    """`generator_flags` for the demo as `dvc repro` leaves it under `demo` (data/demo), with the
    beam data and the SFT pointer the `beam_data` and `train_sft` stages wrote (data/beam/beam_data.json,
    data/sft/pointer_v2.ckpt)."""
    return generator_flags(
        sft_ckpt,
        beam_data,
        demo / "cache" / "query_embeddings.pt",
        demo / "cache" / "candidate_embeddings.pt",
        demo / "models" / "qwen2.5-vl-demo",
        demo / "vqa",
        limit,
    )


def beam_data_flags(
    sampler_cache: Path, vqa_model_path: Path, vqa_root: Path, beam_size: int = 2, limit: int | None = None
) -> list[str]:
    """The beam data stage's flags for these pools and VQA model, a data set in the demo's layout under
    `vqa_root`, a narrow beam (`beam_size`), the CPU, no progress bar."""
    flags = [
        "--sampler_cache", str(sampler_cache), "--vqa_model_path", str(vqa_model_path),
        "--train_ques_path", str(vqa_root / "OpenEnded_mscoco_train2014_questions.json"),
        "--train_ann_path", str(vqa_root / "mscoco_train2014_annotations.json"),
        "--train_image_root", str(vqa_root / "mscoco2014" / "train2014"),
        "--beam_size", str(beam_size), "--device", "cpu", "--no_progress",
    ]  # fmt: skip
    return flags + (["--limit", str(limit)] if limit else [])
