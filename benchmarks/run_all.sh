#!/usr/bin/env bash
# Run every benchmark; each prints its ratio against a baseline measured in the same run.
#   benchmarks/run_all.sh            # full sizes (proposals at K = 9,009 and 443,757: several minutes)
#   QUICK=1 benchmarks/run_all.sh    # smaller sizes, about a minute
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ -n "${QUICK:-}" ]; then
    $PY benchmarks/bench_metric.py --questions 2000
    $PY benchmarks/bench_proposals.py --pool-sizes 9009 --queries 64 --baseline-queries 1 --repeats 1
    $PY benchmarks/bench_pools.py --items 9009 --queries 64 --repeats 1
    $PY benchmarks/bench_vqa_scoring.py --queries 8 --repeats 1
    $PY benchmarks/bench_gt_prob.py --queries 8 --repeats 3
    $PY benchmarks/bench_ray_engine.py --queries 64 --repeats 1
    $PY benchmarks/bench_infoscore.py --queries 2 --pool 16 --repeats 1
    $PY benchmarks/bench_entry_points.py --queries 16 --repeats 1  # needs data/demo (dvc repro generate_rl_data)
    $PY benchmarks/bench_startup.py --quick --warm_runs 1
else
    $PY benchmarks/bench_metric.py
    $PY benchmarks/bench_proposals.py
    $PY benchmarks/bench_pools.py
    $PY benchmarks/bench_vqa_scoring.py
    $PY benchmarks/bench_gt_prob.py
    $PY benchmarks/bench_ray_engine.py
    $PY benchmarks/bench_infoscore.py
    $PY benchmarks/bench_entry_points.py
    $PY benchmarks/bench_startup.py   # builds a VQAv2-size set in a temporary directory (about 2.5 GB, a few minutes)
fi
