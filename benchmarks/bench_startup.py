"""Start-up of the generator at VQAv2 scale, through the CLI: a cold and a warm start, split into phases.

    .venv/bin/python benchmarks/bench_startup.py                      # VQAv2 size: 443,757 questions, 82,783 images
    .venv/bin/python benchmarks/bench_startup.py --quick              # 20,000 questions, 4,000 images: seconds
    .venv/bin/python benchmarks/bench_startup.py --data /tmp/vqav2    # build once, reuse the set on later runs

The synthetic set (`lever_lm.demo.real_size.write_vqav2_size_dataset`) has every field of the
official files, tiny but distinct image files, float32 embeddings [N, --dim] (query and candidate
files identical, as the export writes them), 8 beam-data queries, a seeded random SFT pointer and
the tiny demo Qwen2.5-VL. It lives in a temporary directory (or --data) and is never committed.

Each run is the real CLI (`python -m lever_lm.models.v3.generate_rl_data`, the pipeline's flags,
including --val_ann_path = the training annotations as params.yaml sets it) in a fresh process,
scoring the 8 queries into a new output path. Cold: an empty digest cache (every image hashed,
the annotations parsed); warm: the same command again. The files themselves are in the page
cache in both. A wrapper times the library calls that make up a start:
- digests: the content digests of the run's fingerprint (the model's, every input's, every image's);
- annotations: reading the data set and the scoring annotations;
- embeddings: reading the two embedding files;
- model load: loading the VQA backend;
- imports: the interpreter and the imports before `main` starts;
- pool encoding: the SFT pointer's projection of the whole candidate pool (K = every question);
- scoring: proposing and scoring the 8 queries; other: the rest (the VQA backend's imports, beam
  data, SFT pointer, journal, output).
It prints the peak RSS of the CLI process. It also prints the CPU seconds of the CLI process (user + system), which
other jobs on the machine inflate much less than the wall time. The baseline measured in the same run is the floor of
each cost: a bare `stat` of every image file (for the digests) and a bare `json.load` of both
files (for the annotations).
"""

# ruff: noqa: E402 -- the process settings are applied first, as every entry point does (the CLI runs inherit them)
from __future__ import annotations

from lever_lm.process import apply_process_settings

apply_process_settings()

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICK_QUESTIONS, QUICK_IMAGES = 20_000, 4_000
BEAM_QUERIES = 8
# (module, attribute, phase): the library calls timed in the CLI process.
PHASES = [
    ("lever_lm.rl.fingerprints", "file_digest", "digests"),
    ("lever_lm.rl.fingerprints", "files_digest", "digests"),
    ("lever_lm.vqa.backends", "file_digest", "digests"),
    ("lever_lm.vqa.backends", "directory_digest", "digests"),
    ("lever_lm.data.dataset_paths.DatasetPaths", "load", "annotations"),
    ("lever_lm.rl.inputs", "scoring_answers", "annotations"),
    ("lever_lm.rl.inputs", "load_embeddings", "embeddings"),
    ("lever_lm.rl.generate", "load_backend", "model load"),
    ("lever_lm.models.v2.pointer_selector.PointerSelectorV2", "encode_pool", "pool encoding"),
    ("lever_lm.rl.generate", "run_local", "scoring"),
]
PHASE_ORDER = ["imports", "digests", "annotations", "embeddings", "model load", "pool encoding", "scoring", "other"]


# -- the synthetic inputs ------------------------------------------------------------------------


def build_inputs(data: Path, questions: int, images: int, dim: int) -> dict[str, Path]:
    """Every input of a run under `data`; reused when `data` already holds a set of these sizes."""
    marker = data / "inputs.json"
    wanted = {"questions": questions, "images": images, "dim": dim, "beam_queries": BEAM_QUERIES}
    paths = {
        "vqa": data / "vqa",
        "query_emb": data / "query_embeddings.pt",
        "cand_emb": data / "candidate_embeddings.pt",
        "beam_data": data / "beam.json",
        "sft_ckpt": data / "sft.ckpt",
        "vlm": data / "qwen2.5-vl-tiny",
    }
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return paths
    import torch

    from lever_lm.data.beam_data import save_beam_data
    from lever_lm.data.embeddings import save_embeddings
    from lever_lm.demo.build import PROMPT_TEXT
    from lever_lm.demo.real_size import prompt_corpus, write_vqav2_size_dataset
    from lever_lm.demo.tiny_models import build_tiny_qwen2_5_vl
    from lever_lm.models.v2.checkpoint import save_pointer_checkpoint
    from lever_lm.models.v2.pointer_selector import PointerSelectorV2

    if data.exists():
        shutil.rmtree(data)
    started = time.time()
    write_vqav2_size_dataset(paths["vqa"], questions, images, seed=0)
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(questions, dim, generator=generator), dim=1)
    save_embeddings(embeddings, paths["query_emb"])
    save_embeddings(embeddings, paths["cand_emb"])  # identical, as the export writes them
    del embeddings
    rows = torch.randperm(questions, generator=generator).tolist()
    beam = {}
    for query in sorted(rows[:BEAM_QUERIES]):
        icds = [rows[BEAM_QUERIES + 2 * (query % 97) + k : BEAM_QUERIES + 2 * (query % 97) + k + 2] for k in range(5)]
        beam[str(query)] = {"id_list": [ids + [query] for ids in icds], "score_list": [0.5] * len(icds)}
    save_beam_data(beam, paths["beam_data"])
    torch.manual_seed(0)
    save_pointer_checkpoint(PointerSelectorV2(dim, hidden_dim=256, num_layers=1, use_gate=True), paths["sft_ckpt"])
    build_tiny_qwen2_5_vl(paths["vlm"], prompt_corpus() + PROMPT_TEXT, seed=0)
    marker.write_text(json.dumps(wanted))
    print(f"built the synthetic set in {time.time() - started:.0f}s under {data}", flush=True)
    return paths


def cli_flags(paths: dict[str, Path], output: Path) -> list[str]:
    vqa = paths["vqa"]
    questions = vqa / "OpenEnded_mscoco_train2014_questions.json"
    annotations = vqa / "mscoco_train2014_annotations.json"
    return [
        "--sft_ckpt", str(paths["sft_ckpt"]), "--beam_data", str(paths["beam_data"]),
        "--query_emb", str(paths["query_emb"]), "--cand_emb", str(paths["cand_emb"]),
        "--train_ques_path", str(questions), "--train_ann_path", str(annotations),
        "--train_image_root", str(vqa / "mscoco2014" / "train2014"),
        "--val_ques_path", str(questions), "--val_ann_path", str(annotations),
        "--vqa_model", "qwen2.5_vl_3B", "--vqa_model_path", str(paths["vlm"]),
        "--device", "cpu", "--output_path", str(output), "--no_progress",
    ]  # fmt: skip


# -- one CLI run in a fresh process --------------------------------------------------------------


def run_cli(flags: list[str], cache_dir: Path, report: Path) -> dict:
    """Run the CLI in a child process with phase timers; its report plus the wall time."""
    env = {**os.environ, "LEVER_LM_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(report), "--", *flags],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"the CLI failed (exit {done.returncode}):\n{done.stdout[-4000:]}")
    result = json.loads(report.read_text())
    result["wall"] = wall
    result["log"] = done.stdout
    return result


def child(report: Path, argv: list[str]) -> None:
    """In the child: time the phases around the CLI's `main`, then write them to `report`."""
    import functools
    import importlib

    from lever_lm.rl import cli

    times = {name: 0.0 for name in PHASE_ORDER}
    cpu = {name: 0.0 for name in PHASE_ORDER}
    for module_name, attribute, phase in PHASES:
        owner = _resolve(importlib, module_name)
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args, _original=original, _phase=phase, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return _original(*args, **kwargs)
            finally:
                times[_phase] += time.perf_counter() - t0
                cpu[_phase] += time.process_time() - c0

        setattr(owner, attribute, timed)
    times["imports"], cpu["imports"] = _seconds_since_process_start(), time.process_time()
    main_started = time.perf_counter()
    cli.main(argv)
    main_seconds = time.perf_counter() - main_started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    times["other"] = main_seconds - sum(v for k, v in times.items() if k not in ("imports", "other"))
    cpu["other"] = usage.ru_utime + usage.ru_stime - sum(v for k, v in cpu.items() if k != "other")
    report.write_text(
        json.dumps(
            {
                "phases": times,
                "phases_cpu": cpu,
                "main": main_seconds,
                "cpu": usage.ru_utime + usage.ru_stime,
                "peak_rss_gb": usage.ru_maxrss / 1024**2,
            }
        )
    )


def _resolve(importlib, dotted: str):
    """A module, or a class inside one ("package.module.Class")."""
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError:
        module, _, name = dotted.rpartition(".")
        return getattr(importlib.import_module(module), name)


def _seconds_since_process_start() -> float:
    """The interpreter's start and every import so far (clock-tick resolution)."""
    with open("/proc/self/stat") as handle:
        start_ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as handle:
        uptime = float(handle.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


# -- the floors, measured in the same run --------------------------------------------------------


def stat_floor(image_root: Path) -> float:
    """A bare scandir + stat of every image file: what a warm digest of the folder cannot beat."""
    started = time.perf_counter()
    with os.scandir(image_root) as entries:
        for entry in entries:
            entry.stat()
    return time.perf_counter() - started


def json_floor(vqa: Path) -> tuple[float, float]:
    """A bare json.load of the questions and the annotations file (seconds, peak RSS GB of a child)."""
    code = (
        "import json, resource, sys, time; t = time.perf_counter()\n"
        "for p in sys.argv[1:]: json.load(open(p, encoding='utf-8'))\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2)"
    )
    files = [vqa / "OpenEnded_mscoco_train2014_questions.json", vqa / "mscoco_train2014_annotations.json"]
    out = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True, check=True)
    seconds, rss = out.stdout.split()
    return float(seconds), float(rss)


# -- reporting -----------------------------------------------------------------------------------


def describe_machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} CPUs; Python {platform.python_version()}; load average {load}"


def print_table(runs: dict[str, list[dict]]) -> None:
    """Wall seconds per phase, then the CPU seconds of the same run."""
    print(" | ".join(["run", "whole CLI", *PHASE_ORDER, "peak RSS"]))
    for name, results in runs.items():
        for r in results:
            phases = [f"{r['phases'][p]:.2f}" for p in PHASE_ORDER]
            print(" | ".join([f"{name} (wall s)", f"{r['wall']:.2f}", *phases, f"{r['peak_rss_gb']:.2f} GB"]))
            phases = [f"{r['phases_cpu'][p]:.2f}" for p in PHASE_ORDER]
            print(" | ".join([f"{name} (CPU s)", f"{r['cpu']:.2f}", *phases, ""]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=443_757, help="questions in the synthetic set")
    parser.add_argument("--images", type=int, default=82_783, help="image files in the synthetic set")
    parser.add_argument("--dim", type=int, default=512, help="embedding width d (CLIP ViT-B/32: 512)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_QUESTIONS:,} questions, {QUICK_IMAGES:,} images")
    parser.add_argument("--warm_runs", type=int, default=3, help="warm runs (the median and the best count)")
    parser.add_argument("--data", type=Path, help="where to build (and keep) the synthetic set; default: a temp dir")
    parser.add_argument("--build_only", action="store_true", help="only build the synthetic set (with --data)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
        return
    if args.quick:
        args.questions, args.images = QUICK_QUESTIONS, QUICK_IMAGES
    print(f"machine: {describe_machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as scratch:
        scratch = Path(scratch)
        data = args.data or scratch / "data"
        paths = build_inputs(data, args.questions, args.images, args.dim)
        if args.build_only:
            return
        cache = scratch / "cache"
        image_root = paths["vqa"] / "mscoco2014" / "train2014"
        runs: dict[str, list[dict]] = {"cold": [], "warm": []}
        runs["cold"].append(run_cli(cli_flags(paths, scratch / "out0" / "rl.json"), cache, scratch / "r0.json"))
        for i in range(1, args.warm_runs + 1):
            flags = cli_flags(paths, scratch / f"out{i}" / "rl.json")
            runs["warm"].append(run_cli(flags, cache, scratch / f"r{i}.json"))
        stat_seconds = min(stat_floor(image_root) for _ in range(3))
        json_seconds, json_rss = json_floor(paths["vqa"])
    print(f"\n{args.questions:,} questions, {args.images:,} image files, d = {args.dim}, {BEAM_QUERIES} queries")
    print_table(runs)
    warm = runs["warm"]
    median = {p: statistics.median(r["phases"][p] for r in warm) for p in PHASE_ORDER}
    wall = statistics.median(r["wall"] for r in warm)
    cpu = statistics.median(r["cpu"] for r in warm)
    rss = max(r["peak_rss_gb"] for r in warm)
    print(f"\nwarm (median of {len(warm)}): whole CLI {wall:.2f}s ({cpu:.2f} CPU s), digests {median['digests']:.2f}s, "
          f"annotations {median['annotations']:.2f}s, embeddings {median['embeddings']:.2f}s, "
          f"model load {median['model load']:.2f}s, pool encoding {median['pool encoding']:.2f}s, imports {median['imports']:.2f}s; peak RSS {rss:.2f} GB")  # fmt: skip
    print(f"floors: scandir+stat of {args.images:,} images {stat_seconds:.2f}s (warm digests / floor: "
          f"{median['digests'] / stat_seconds:.1f}x); json.load of both files {json_seconds:.2f}s, "
          f"peak RSS {json_rss:.2f} GB (warm annotations / json.load: {median['annotations'] / json_seconds:.2f}x)")  # fmt: skip
    print(f"machine after the runs: {describe_machine()}")
    if args.json:
        figures = {k: [{x: y for x, y in r.items() if x != "log"} for r in v] for k, v in runs.items()}
        floors = {"stat_seconds": stat_seconds, "json_seconds": json_seconds, "json_rss_gb": json_rss}
        args.json.write_text(json.dumps({"runs": figures, "floors": floors, "machine": describe_machine()}, indent=1))


if __name__ == "__main__":
    main()
