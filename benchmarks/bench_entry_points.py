"""The DVC stage's path against the seed command, on the same demo queries, with another process holding a core.

    .venv/bin/python benchmarks/bench_entry_points.py              # 32 queries, 2 rounds
    .venv/bin/python benchmarks/bench_entry_points.py --queries 16 --repeats 1

Both paths run the whole generator in a fresh process on the pipeline's demo inputs (`dvc repro
generate_rl_data` builds `data/demo`), with the settings of params.yaml:
- stage: `python stages/generate_rl_data.py --limit Q --output_path TMP` (params.yaml's keys
  become the flags, as under `dvc repro`);
- seed: `python -m lever_lm.models.v3.generate_rl_data` with the very same flags.
Both apply the process settings (`lever_lm.process`: idle OpenMP threads sleep) before torch
loads. A reference run gives the stage `OMP_WAIT_POLICY=ACTIVE` (a user's value wins): it shows
what spinning threads cost on a shared CPU. While they run, a busy loop holds one core. Each run
starts from an empty journal; the paths take turns for `--repeats` rounds and the medians count.
Three figures per run: the generation time from the meta sidecar (inputs to final JSON), the
process's wall time (also Python start, imports, model load), and the CPU time it used (user +
system; spinning threads burn CPU even where the wall time is lost in the noise of a shared
machine). Every run must write the same bytes.
"""

# ruff: noqa: E402 -- the process settings are applied before torch is imported
from __future__ import annotations

from lever_lm.process import apply_process_settings

apply_process_settings()

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUSY_LOOP = "while True: pass"


def stage_flags() -> list[str]:
    """params.yaml's flags, exactly as the stage builds them."""
    from lever_lm.rl.cli import build_parser
    from lever_lm.rl.params import stage_argv

    return stage_argv(ROOT / "params.yaml", ROOT / "dvc.yaml", build_parser())


def run(command: list[str], output: Path, env: dict) -> tuple[tuple[float, float, float], bytes]:
    """((generation seconds from the sidecar, wall seconds, CPU seconds), output bytes) of one fresh run."""
    cpu_before, started = _children_cpu(), time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall, cpu = time.perf_counter() - started, _children_cpu() - cpu_before
    meta = json.loads(output.with_name(output.name + ".meta.json").read_text())
    return (meta["timing"]["seconds"], wall, cpu), output.read_bytes()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=32, help="the first N queries of the demo's beam data")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no_reference", action="store_true", help="skip the OMP_WAIT_POLICY=ACTIVE reference")
    args = parser.parse_args()
    if not (ROOT / "data/sft/pointer_v2.ckpt").is_file():
        raise SystemExit("run `dvc repro generate_rl_data` first: it builds the demo's inputs")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "PYTORCH_CUDA_ALLOC_CONF")}
    env["HF_HUB_OFFLINE"] = "1"
    ways = {
        "stage": ([sys.executable, "stages/generate_rl_data.py"], env),
        "seed": ([sys.executable, "-m", "lever_lm.models.v3.generate_rl_data", *stage_flags()], env),
    }
    if not args.no_reference:
        ways["stage, OMP_WAIT_POLICY=ACTIVE"] = (ways["stage"][0], {**env, "OMP_WAIT_POLICY": "ACTIVE"})
    print(f"machine: {_cpu_name()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in ways}
    outputs = set()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_entry_points_") as tmp:
            for round_ in range(args.repeats):
                for name, (command, run_env) in ways.items():
                    output = Path(tmp) / f"{round_}-{len(times[name])}-{name.split(',')[0]}" / "rl.json"
                    extra = ["--limit", str(args.queries), "--output_path", str(output), "--no_progress"]
                    figures, data = run([*command, *extra], output, run_env)
                    times[name].append(figures)
                    outputs.add(data)
                    print(f"round {round_ + 1}: {name}: generation {figures[0]:.1f} s, process {figures[1]:.1f} s, "
                          f"CPU {figures[2]:.1f} s")  # fmt: skip
    finally:
        busy.kill()
        busy.wait()
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    assert len(outputs) == 1, "every run must write the same bytes"
    median = {name: [statistics.median(f[i] for f in t) for i in range(3)] for name, t in times.items()}
    base = median["seed"]
    print(f"\n{args.queries} queries, one core held by a busy loop; medians of {args.repeats} rounds (x the seed's):")
    for name, (seconds, wall, cpu) in median.items():
        print(
            f"  {name:30s} generation {seconds:5.1f} s ({seconds / base[0]:.2f}x), "
            f"process {wall:5.1f} s ({wall / base[1]:.2f}x), CPU {cpu:5.1f} s ({cpu / base[2]:.2f}x)"
        )


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


if __name__ == "__main__":
    main()
