"""Chaos: the RL generator and the beam data stage killed with SIGKILL at random moments (start-up,
scoring, a power loss's NUL tail, the final write, a Ray worker) write an uninterrupted run's bytes
and leave nothing behind.

The short version of `benchmarks/chaos.py`: a few kills per engine and for the beam data stage, on
the demo's smallest settings.
The driver itself is checked first, on a toy resumable job, to catch what it must catch.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections import Counter

import pytest

from lever_lm.chaos import (
    Job,
    Output,
    beam_data_flags,
    beam_data_job,
    generator_flags,
    generator_job,
    json_except,
    local_ray_cluster,
    plan_rounds,
    run_chaos,
)
from lever_lm.chaos.driver import MODES, describe_difference

# A resumable toy job: a journal of 6 lines after a header (torn or NUL tails dropped on restart),
# then `out.txt` written slowly through a temporary file named as lever_lm.io names them.
TOY = textwrap.dedent("""
    import os, subprocess, sys, tempfile, time
    from pathlib import Path
    run, flavour = Path(sys.argv[1]), sys.argv[2]
    if flavour == "orphan":  # a helper process that outlives a killed job
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(20)"], start_new_session=True)
    journal = run / "toy.journal" / "lines.txt"
    journal.parent.mkdir(exist_ok=True)
    data = journal.read_bytes() if journal.exists() else b""
    data = data[: data.rfind(b"\\n") + 1] or b"header\\n"
    journal.write_bytes(data)
    time.sleep(0.1)
    with open(journal, "ab") as handle:
        for i in range(data.count(b"\\n") - 1, 6):
            time.sleep(0.1)
            handle.write(b"line %d\\n" % i)
            handle.flush()
    if flavour != "no_cleanup":
        for stale in run.glob(".out.txt.*.tmp"):
            stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=".out.txt.", suffix=".tmp", dir=run)
    with os.fdopen(fd, "wb") as handle:
        for _ in range(4):
            handle.write(b"x" * 100)
            handle.flush()
            time.sleep(0.05)
    os.replace(tmp, run / "out.txt")
    if flavour == "unstable":
        (run / "out.txt").write_text(str(os.getpid()))
""")


def toy_job(flavour: str) -> Job:
    return Job(
        name=f"toy-{flavour}",
        command=lambda run_dir: [sys.executable, "-c", TOY, str(run_dir), flavour],
        journal="toy.journal/lines.txt",
        outputs=(Output("out.txt"),),
        timeout=60,
    )


def test_the_plan_draws_every_mode_before_repeating_and_ends_rounds_with_the_final_write():
    import random

    rounds = plan_rounds(random.Random(3), MODES, kills=10, per_round=3)
    drawn = [mode for r in rounds for mode in r]
    assert len(drawn) == 10 and sorted(drawn[:4]) == sorted(MODES) and sorted(drawn[4:8]) == sorted(MODES)
    assert all(len(r) <= 3 for r in rounds)
    assert all("final_write" not in r[:-1] for r in rounds), "the final write ends its round"
    assert plan_rounds(random.Random(3), MODES, 10, 3) == rounds, "seeded"


def test_a_toy_job_killed_in_every_way_passes(tmp_path):
    lines = []
    report = run_chaos([toy_job("clean")], kills=4, seed=1, workdir=tmp_path, say=lines.append, settle_seconds=2)
    assert report.ok, "\n".join(lines)
    assert sorted(k.mode for k in report.kills) == sorted(MODES)
    assert all(k.hit for k in report.kills), "\n".join(lines)
    final = next(k for k in report.kills if k.mode == "final_write")
    assert final.phase.startswith("final write: out.txt") and ".out.txt." in final.note, "\n".join(lines)
    power = next(k for k in report.kills if k.mode == "power_loss")
    assert "zeroed" in power.note
    assert lines[-1].startswith("chaos: 4 kills, 4 hit a live process") and lines[-1].endswith("no leftovers")


@pytest.mark.parametrize(
    "flavour, found",
    [
        ("no_cleanup", "LEFTOVER: .out.txt."),  # the temporary file of the killed final write stays
        ("unstable", "DIFFERENT: out.txt: "),  # the output changes from run to run
        ("orphan", "LEFTOVER: process "),  # a process of the killed job lives on
    ],
)
def test_the_driver_catches_a_leftover_a_difference_and_a_stray_process(tmp_path, flavour, found):
    lines = []
    report = run_chaos(
        [toy_job(flavour)], kills=1, seed=0, workdir=tmp_path, say=lines.append, modes=["final_write"], settle_seconds=1
    )
    assert not report.ok and report.kills[0].hit
    assert found in report.rounds[0].verdict(), "\n".join(lines)
    assert "FAILED (toy-" in lines[-1]


def test_the_sidecar_is_compared_without_the_runs_own_record(tmp_path):
    compare = json_except("timing", "run.created")
    meta = {"counts": {"queries": 2}, "journals": [f"{tmp_path}/j"], "timing": 1.5, "run": {"created": "x", "limit": 2}}
    (tmp_path / "m.json").write_text(json.dumps(meta))
    assert compare(tmp_path / "m.json", tmp_path) == {
        "counts": {"queries": 2},
        "journals": ["<run>/j"],
        "run": {"limit": 2},
    }
    assert describe_difference({"run": {"limit": 2}}, {"run": {"limit": 3}}) == "differs at run.limit (2 vs 3)"
    assert (
        describe_difference(b"abcd", b"abXd") == "4 bytes where the uninterrupted run has 4; first difference at byte 2"
    )


def _flags(rl_inputs) -> list[str]:
    return generator_flags(
        rl_inputs.sft_ckpt, rl_inputs.beam_data, rl_inputs.query_emb, rl_inputs.cand_emb, rl_inputs.vlm, rl_inputs.vqa
    )


def _check(report, lines: list[str], modes: set[str]) -> None:
    log = "\n".join(lines)
    assert report.ok, log
    assert {k.mode for k in report.kills} == modes
    assert all(k.hit for k in report.kills if k.mode != "final_write"), log  # the final write may end first
    assert Counter(k.job for k in report.kills) == Counter({report.rounds[0].job: len(modes)})


def test_the_local_engine_killed_at_random_writes_the_uninterrupted_bytes(rl_inputs, tmp_path):
    lines = []
    report = run_chaos([generator_job("local", _flags(rl_inputs))], kills=4, seed=0, workdir=tmp_path, say=lines.append)
    _check(report, lines, set(MODES))
    print("\n".join(lines))


def test_the_ray_engine_killed_at_random_writes_the_uninterrupted_bytes(rl_inputs, tmp_path):
    pytest.importorskip("ray")
    lines = []
    modes = ["scoring", "worker", "final_write"]  # the driver killed mid-scoring and in its final write, a worker
    with local_ray_cluster() as address:  # joined by every run: one Ray start, not one per run
        job = generator_job("ray", _flags(rl_inputs), engine="ray", ray_address=address)
        report = run_chaos([job], kills=3, seed=0, workdir=tmp_path, say=lines.append, modes=modes)
    _check(report, lines, set(modes))
    print("\n".join(lines))


def test_the_beam_data_stage_killed_at_random_writes_the_uninterrupted_bytes(rl_inputs, tmp_path):
    lines = []
    vlm = rl_inputs.demo / "models" / "qwen2.5-vl-tiny"
    job = beam_data_job("beam_data", beam_data_flags(rl_inputs.sampler_cache, vlm, rl_inputs.vqa))
    report = run_chaos([job], kills=4, seed=0, workdir=tmp_path, say=lines.append)
    _check(report, lines, set(MODES))
    print("\n".join(lines))
