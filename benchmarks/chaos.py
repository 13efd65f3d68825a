"""Chaos run: kill the RL generator with SIGKILL at random moments, restart it, compare the bytes.

    .venv/bin/python benchmarks/chaos.py                         # 6 kills per engine, the demo's first 12 queries
    nice -n 10 .venv/bin/python benchmarks/chaos.py --kills 25   # the long run: 50 kills
    .venv/bin/python benchmarks/chaos.py --engines local -- --pool per_query --sampler data/demo/sampler_cache.json

For each engine (local; Ray with 2 workers, each run starting its own Ray as `--engine ray` does
by default, or all joining one cluster: --shared_ray, --ray_address), one uninterrupted run is the
reference. Then the generator is killed with `kill -9` during
start-up, mid-scoring after a random number of journal lines (also leaving the journal's tail as
NUL bytes, as a power loss does), during the final write, and for Ray, a worker; it is restarted
after each kill. Every round's data file and sidecar must equal the reference's (the sidecar
without its record of the process: timing, Ray workers, date, batch size) and its directory must
hold nothing more: no temporary or lock file, no process left running. The plan is seeded.

Inputs: the demo as `dvc repro` leaves it under --demo (data/demo), the smallest proposal set
(2 beams, 1 sample, 1 random), the CPU, one torch thread. Generator flags after `--` are added
(later flags win). Exit status: 0 when every round is identical with no leftovers, 1 otherwise,
2 when the inputs are missing.
"""

# ruff: noqa: E402 -- the process settings are applied before torch is imported
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

from lever_lm.chaos import ChaosError, demo_generator_flags, generator_job, local_ray_cluster, run_chaos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=6, help="kills per engine")
    parser.add_argument("--seed", type=int, default=0, help="seed of the plan (which kills, how many lines, delays)")
    parser.add_argument("--engines", nargs="+", choices=["local", "ray"], default=["local", "ray"], help="the jobs")
    parser.add_argument("--demo", type=Path, default=Path("data/demo"), help="the demo that `dvc repro` built")
    parser.add_argument("--limit", type=int, default=12, help="queries of the demo's beam data (0: all)")
    ray = parser.add_mutually_exclusive_group()
    ray.add_argument("--ray_address", help="join this Ray cluster; none: every run starts its own Ray")
    ray.add_argument("--shared_ray", action="store_true", help="start one local Ray cluster for every run to join")
    parser.add_argument(
        "--workdir", type=Path, help="where the runs and their logs go; none: a temporary directory, removed at the end"
    )
    parser.add_argument("generator_flags", nargs="*", default=[], help="more generator flags, after --")
    args = parser.parse_args(argv)
    missing = [p for p in (args.demo / "sft" / "pointer_v2.ckpt", args.demo / "beam_data.json") if not p.is_file()]
    if missing:
        print(f"error: {missing[0]}: not found; build the demo with `dvc repro` or give --demo", file=sys.stderr)
        return 2
    flags = [*demo_generator_flags(args.demo.resolve(), args.limit or None), *args.generator_flags]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; python {platform.python_version()}"
    )
    print(f"chaos: {args.kills} kills per engine ({', '.join(args.engines)}), seed {args.seed}, limit {args.limit}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chaos"))
    started = time.time()
    ok = False
    try:
        with local_ray_cluster() if args.shared_ray and "ray" in args.engines else contextlib.nullcontext() as address:
            jobs = [generator_job(engine, flags, engine, address or args.ray_address) for engine in args.engines]
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
