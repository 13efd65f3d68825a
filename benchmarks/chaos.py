"""Chaos run: kill the RL generator and the beam data stage with SIGKILL at random moments, restart them,
compare the bytes.

    .venv/bin/python benchmarks/chaos.py                         # 6 kills per job, the demo's first 12 queries
    nice -n 10 .venv/bin/python benchmarks/chaos.py --kills 25   # the long run: 75 kills
    .venv/bin/python benchmarks/chaos.py --jobs local -- --pool per_query --sampler_cache data/pools/sampler_cache.json

For each job (the generator on the local engine; on Ray with 2 workers, each run starting its own
Ray as `--engine ray` does by default, or all joining one cluster: --shared_ray, --ray_address; the
InfoScore beam data stage, beam size 2, over the first --beam_queries queries of the demo's pools),
one uninterrupted run is the reference. Then the job is killed with `kill -9` during
start-up, mid-scoring after a random number of journal lines (also leaving the journal's tail as
NUL bytes, as a power loss does), during the final write, and for Ray, a worker; it is restarted
after each kill. Every round's data file and sidecar must equal the reference's (the sidecar
without its record of the process: timing, Ray workers, date, batch size) and its directory must
hold nothing more: no temporary or lock file, no process left running. The plan is seeded.

Inputs: the demo as `dvc repro` leaves it under --demo (data/demo), --beam_data
(data/beam/beam_data.json, the `beam_data` stage's output), --sft_ckpt (data/sft/pointer_v2.ckpt,
the `train_sft` stage's) and --sampler_cache (data/pools/sampler_cache.json, the `sample_pools`
stage's), the generator's smallest proposal set
(2 beams, 1 sample, 1 random), the CPU, one torch thread. Generator flags after `--` are added
(later flags win). Exit status: 0 when every round is identical with no leftovers, 1 otherwise,
2 when the inputs are missing.
"""

# ruff: noqa: E402 -- the process settings are applied first, as every entry point does (the runs inherit them)
from __future__ import annotations

from lever_lm.process import apply_process_settings

apply_process_settings()

import argparse
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lever_lm.chaos import (
    ChaosError,
    beam_data_flags,
    beam_data_job,
    demo_generator_flags,
    generator_job,
    local_ray_cluster,
    run_chaos,
)

JOBS = ["local", "ray", "beam_data"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=6, help="kills per job")
    parser.add_argument("--seed", type=int, default=0, help="seed of the plan (which kills, how many lines, delays)")
    parser.add_argument(
        "--jobs", nargs="+", choices=JOBS, default=JOBS, help="the generator on each engine; the beam data stage"
    )
    parser.add_argument("--demo", type=Path, default=Path("data/demo"), help="the demo that `dvc repro` built")
    parser.add_argument(
        "--beam_data", type=Path, default=Path("data/beam/beam_data.json"), help="the beam data that `dvc repro` wrote"
    )
    parser.add_argument(
        "--sft_ckpt", type=Path, default=Path("data/sft/pointer_v2.ckpt"), help="the SFT pointer that `dvc repro` wrote"
    )
    parser.add_argument(
        "--sampler_cache",
        type=Path,
        default=Path("data/pools/sampler_cache.json"),
        help="the pools that `dvc repro` wrote (the beam data job's queries)",
    )
    parser.add_argument("--limit", type=int, default=12, help="queries of the demo's beam data (0: all)")
    parser.add_argument("--beam_queries", type=int, default=4, help="queries of the pools for the beam data job")
    ray = parser.add_mutually_exclusive_group()
    ray.add_argument("--ray_address", help="join this Ray cluster; none: every run starts its own Ray")
    ray.add_argument("--shared_ray", action="store_true", help="start one local Ray cluster for every run to join")
    parser.add_argument(
        "--workdir", type=Path, help="where the runs and their logs go; none: a temporary directory, removed at the end"
    )
    parser.add_argument("generator_flags", nargs="*", default=[], help="more generator flags, after --")
    args = parser.parse_args(argv)
    missing = [p for p in (args.sft_ckpt, args.beam_data, args.sampler_cache) if not p.is_file()]
    if missing:
        print(f"error: {missing[0]}: not found; build the demo with `dvc repro` or give --demo", file=sys.stderr)
        return 2
    flags = [
        *demo_generator_flags(
            args.demo.resolve(), args.beam_data.resolve(), args.sft_ckpt.resolve(), args.limit or None
        ),
        *args.generator_flags,
    ]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; python {platform.python_version()}"
    )
    print(f"chaos: {args.kills} kills per job ({', '.join(args.jobs)}), seed {args.seed}, limit {args.limit}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chaos"))
    started = time.time()
    ok = False
    try:
        with local_ray_cluster() if args.shared_ray and "ray" in args.jobs else contextlib.nullcontext() as address:
            jobs = [generator_job(e, flags, e, address or args.ray_address) for e in ("local", "ray") if e in args.jobs]
            if "beam_data" in args.jobs:
                vlm = args.demo.resolve() / "models" / "qwen2.5-vl-demo"
                vqa = args.demo.resolve() / "vqa"
                flags = beam_data_flags(args.sampler_cache.resolve(), vlm, vqa, limit=args.beam_queries or None)
                jobs.append(beam_data_job("beam_data", flags))
            ok = run_chaos(jobs, args.kills, args.seed, workdir).ok
    except ChaosError as error:
        print(f"error: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if ok and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not ok:
            print(f"the runs and their logs are kept in {workdir}")
    print(f"wall time {time.time() - started:.0f}s; load average now {os.getloadavg()[0]:.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
