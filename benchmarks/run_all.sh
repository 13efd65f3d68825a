#!/usr/bin/env bash
# Run every benchmark; each prints its ratio against a baseline measured in the same run.
#   benchmarks/run_all.sh            # full sizes (proposals at K = 9,009 and 443,757: several minutes)
#   QUICK=1 benchmarks/run_all.sh    # a smoke run: every script at its smallest size, one round, no figure to read
# CI runs the quick mode (.ci/run): every benchmark script starts and exits 0, or is listed as skipped with
# the reason. Not in the full run: bench_real_size.py (its CPU and GPU commands are in benchmarks/README.md),
# chaos.py (no timing; `benchmarks/chaos.py --kills 25 --limit 24`) and the GPU check (gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
skip() { echo "skipped: $1"; }
if [ -n "${QUICK:-}" ]; then
    started=$SECONDS
    demo=$(mktemp -d)
    trap 'rm -rf "$demo"' EXIT
    $PY -m lever_lm.demo.build --out "$demo" --seed 0 >/dev/null 2>&1  # one demo for the scripts that read it
    $PY benchmarks/bench_metric.py --questions 2000
    $PY benchmarks/bench_proposals.py --pool-sizes 9009 --queries 64 --baseline-queries 1 --repeats 1
    $PY benchmarks/bench_pools.py --items 9009 --queries 64 --repeats 1
    $PY benchmarks/bench_vqa_scoring.py --demo-dir "$demo" --queries 4 --candidates 4 --repeats 1
    $PY benchmarks/bench_gt_prob.py --demo-dir "$demo" --queries 4 --candidates 4 --repeats 1
    $PY benchmarks/bench_ray_engine.py --demo-dir "$demo" --queries 8 --block 4 --repeats 1
    $PY benchmarks/bench_infoscore.py --demo-dir "$demo" --queries 1 --pool 8 --repeats 1
    $PY benchmarks/bench_startup.py --questions 2000 --images 400 --warm_runs 1
    $PY benchmarks/bench_real_size.py --device cpu --narrow --queries 1 --candidates 2 --batch_sizes 1 2 --photos 9
    if [ -f data/sft/pointer_v2.ckpt ]; then
        $PY benchmarks/bench_entry_points.py --queries 2 --repeats 1 --no_reference
    else
        skip "bench_entry_points.py: it runs the pipeline's demo inputs, which \`dvc repro\` builds (data/sft is absent)"
    fi
    skip "chaos.py: it kills jobs on the inputs \`dvc repro\` builds; tests/test_chaos.py runs a short version"
    skip "gpu_check.sh, gpu_check.py: they need a CUDA GPU"
    echo "quick run done in $((SECONDS - started)) s"
else
    $PY benchmarks/bench_metric.py
    $PY benchmarks/bench_proposals.py
    $PY benchmarks/bench_pools.py
    $PY benchmarks/bench_vqa_scoring.py
    $PY benchmarks/bench_gt_prob.py
    $PY benchmarks/bench_ray_engine.py
    $PY benchmarks/bench_infoscore.py
    $PY benchmarks/bench_entry_points.py   # needs the demo's pipeline outputs (dvc repro)
    $PY benchmarks/bench_startup.py   # builds a VQAv2-size set in a temporary directory (about 2.5 GB, a few minutes)
fi
