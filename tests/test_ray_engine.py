"""The Ray engine on the demo (CPU, one local Ray cluster for the module, the tiny model): it writes
the local engine's bytes, survives a killed worker, resumes after a killed driver, and refuses a
bad address before writing anything."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from lever_lm.errors import InputError  # noqa: E402
from lever_lm.models.v3 import generate_rl_data  # noqa: E402
from lever_lm.rl.blocks import QueryResult  # noqa: E402
from lever_lm.rl.engines import ray as ray_engine  # noqa: E402
from lever_lm.rl.engines.ray import Block, BlockWorker, Dispatcher, Worker, WorkersLost, worker_slots  # noqa: E402
from lever_lm.rl.fingerprints import RESULT_CODE  # noqa: E402
from lever_lm.rl.journal import Journal  # noqa: E402
from lever_lm.vqa.backends.base import GenerationAborted  # noqa: E402

SMALL = ["--num_beams", "2", "--temps", "1.0", "--num_samples_per_temp", "1", "--num_random", "1", "--device", "cpu"]
BLOCK = ["--proposal_block", "2"]  # 12 queries -> 6 blocks, so that two workers share the work
CLUSTER = """
import sys, ray
ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[1])
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test module closes our stdin
ray.shutdown()
"""


def argv(rl_inputs, output: Path, *extra: str) -> list[str]:
    return [
        "--sft_ckpt", str(rl_inputs.sft_ckpt), "--beam_data", str(rl_inputs.beam_data),
        "--output_path", str(output), "--query_emb", str(rl_inputs.query_emb), "--cand_emb", str(rl_inputs.cand_emb),
        "--vqa_model_path", str(rl_inputs.vlm), *rl_inputs.dataset_flags(), *SMALL, *BLOCK, "--no_progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs for the whole module, in its own process; every run joins it
    by address, like a driver joining a real cluster, and it is shut down (its logs removed) after
    the module."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the in-process drivers join without a token
    sessions = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths live under it
    process = subprocess.Popen(
        [sys.executable, "-c", CLUSTER, sessions], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
    )
    address = process.stdout.readline().strip()
    assert re.fullmatch(r"[\d.]+:\d+", address), f"the test cluster did not start: {address!r}"
    yield address
    process.stdin.close()
    process.wait(timeout=120)
    shutil.rmtree(sessions, ignore_errors=True)
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture(scope="module")
def local_output(rl_inputs, tmp_path_factory) -> Path:
    """The local engine's output, from a process that must never import ray."""
    output = tmp_path_factory.mktemp("local") / "rl.json"
    code = textwrap.dedent("""
        import sys
        from lever_lm.models.v3 import generate_rl_data
        generate_rl_data.main(sys.argv[1:])
        assert "ray" not in sys.modules, "the local engine imported ray"
    """)
    subprocess.run(
        [sys.executable, "-c", code, *argv(rl_inputs, output)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    return output


def ray_argv(rl_inputs, output: Path, cluster: str, *extra: str) -> list[str]:
    return argv(rl_inputs, output, "--engine", "ray", "--ray_address", cluster, "--num_workers", "2", *extra)


def test_the_local_engine_never_imports_ray(local_output):
    assert local_output.exists()  # the fixture's process asserted it


def test_two_workers_write_the_local_engines_bytes(cluster, local_output, rl_inputs, tmp_path, one_torch_thread):
    output = tmp_path / "rl.json"
    generate_rl_data.main(ray_argv(rl_inputs, output, cluster))
    assert output.read_bytes() == local_output.read_bytes()
    meta = json.loads(output.with_name("rl.json.meta.json").read_text())
    workers = meta["engine"]["workers"]
    assert meta["engine"]["startup_seconds"] > 0 and meta["engine"]["scoring_seconds"] > 0
    assert [w["worker"] for w in workers] == [0, 1]
    assert sum(w["queries"] for w in workers) == 12 and sum(w["blocks"] for w in workers) == 6
    assert sum(w["candidates"] for w in workers) == meta["counts"]["candidates"]
    assert all(w["lost"] is None and w["pid"] > 0 and w["load_seconds"] > 0 for w in workers)
    assert len({w["pid"] for w in workers}) == 2
    assert meta["request"]["engine"] == "ray" and meta["timing"]["queries_processed_this_run"] == 12


def test_a_killed_worker_is_replaced_and_the_output_is_identical(
    cluster, local_output, rl_inputs, tmp_path, caplog, monkeypatch, one_torch_thread
):
    caplog.set_level(logging.INFO, logger="lever_lm.rl.engines.ray")
    append, killed = Journal.append, []

    def append_then_kill_a_worker(journal, *args, **kwargs):
        append(journal, *args, **kwargs)
        if not killed:  # after the first journaled query, while blocks are still to do
            number, pid = re.search(r"Ray worker (\d+) ready .*pid (\d+)", caplog.text).groups()
            os.kill(int(pid), signal.SIGKILL)
            killed.extend([int(number), int(pid)])

    monkeypatch.setattr(Journal, "append", append_then_kill_a_worker)
    output = tmp_path / "rl.json"
    generate_rl_data.main(ray_argv(rl_inputs, output, cluster))
    assert output.read_bytes() == local_output.read_bytes()
    workers = json.loads(output.with_name("rl.json.meta.json").read_text())["engine"]["workers"]
    number, pid = killed
    assert len(workers) == 3, "the lost worker is replaced"
    assert workers[number]["pid"] == pid and "died" in workers[number]["lost"]
    assert [w["lost"] for w in workers].count(None) == 2
    assert sum(w["queries"] for w in workers) == 12
    assert f"Ray worker {number} lost" in caplog.text


def test_a_killed_driver_resumes_from_the_journal(cluster, local_output, rl_inputs, tmp_path, one_torch_thread):
    output = tmp_path / "rl.json"
    cmd = [sys.executable, "-m", "lever_lm.models.v3.generate_rl_data", *ray_argv(rl_inputs, output, cluster)]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines, deadline = 0, time.time() + 180
    while time.time() < deadline and driver.poll() is None:
        journals = list((tmp_path / "rl.json.journal").glob("*/shard-0-of-1.jsonl"))
        lines = journals[0].read_bytes().count(b"\n") if journals else 0
        if lines >= 3:  # the header and two queries
            break
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert 3 <= lines < 13, "the kill should land mid-run"
    assert not output.exists()
    generate_rl_data.main(ray_argv(rl_inputs, output, cluster))
    assert output.read_bytes() == local_output.read_bytes()
    meta = json.loads(output.with_name("rl.json.meta.json").read_text())
    assert meta["timing"]["queries_processed_this_run"] < 12, "the rerun resumed"


def test_beam_data_on_two_workers_writes_the_local_engines_bytes(
    cluster, rl_inputs, tmp_path, monkeypatch, one_torch_thread
):
    """The InfoScore beam search is another job of the same engine: same blocks, same journal, same bytes."""
    from lever_lm.infoscore import cli, generate

    monkeypatch.setattr(generate, "BLOCK_SIZE", 2)  # 4 queries -> 2 blocks, one per worker
    pools = json.loads((rl_inputs.beam_data.parent / "pools.json").read_text())
    (tmp_path / "pools.json").write_text(json.dumps(dict(list(pools.items())[:4])))
    flags = [*rl_inputs.dataset_flags(), "--sampler_cache", str(tmp_path / "pools.json"), "--vqa_model_path",
             str(rl_inputs.vlm), "--device", "cpu", "--beam_size", "2", "--no_progress"]  # fmt: skip
    cli.main([*flags, "--output_path", str(tmp_path / "local.json")])
    cli.main([*flags, "--output_path", str(tmp_path / "ray.json"), "--engine", "ray", "--ray_address", cluster,
              "--num_workers", "2"])  # fmt: skip
    assert (tmp_path / "ray.json").read_bytes() == (tmp_path / "local.json").read_bytes()
    meta = json.loads((tmp_path / "ray.json.meta.json").read_text())
    workers = meta["engine"]["workers"]
    assert len(workers) == 2 and sum(w["queries"] for w in workers) == 4
    assert (
        sum(w["candidates"] for w in workers)
        == meta["counts"]["prompts"]
        == meta["timing"]["prompts_processed_this_run"]
    )


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1", "not-an-address"])
def test_a_bad_address_is_one_line_and_writes_nothing(address, rl_inputs, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        generate_rl_data.main(argv(rl_inputs, tmp_path / "rl.json", "--engine", "ray", "--ray_address", address))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --ray_address {address}") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_cluster_without_the_gpus_asked_for_is_refused(cluster, rl_inputs, tmp_path, capsys):
    args = ray_argv(rl_inputs, tmp_path / "rl.json", cluster, "--device", "cuda:0")
    with pytest.raises(SystemExit) as stop:
        generate_rl_data.main(args)
    assert stop.value.code == 2
    assert "room for 0 workers with 1 GPU(s)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--num_workers", "2"], "only apply with --engine ray"),
        (["--engine", "ray", "--num_workers", "0"], "--num_workers must be >= 1"),
        (["--engine", "ray", "--gpus_per_worker", "1.5"], "a fraction in [0, 1] or a whole number"),
    ],
)
def test_engine_flags_are_checked_before_anything_is_read(flags, problem, rl_inputs, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        generate_rl_data.main(argv(rl_inputs, tmp_path / "rl.json", *flags))
    assert stop.value.code == 2
    assert problem in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "cpus, gpus, per_worker, slots",
    [(2, 0, 0, 2), (64, 8, 1, 8), (64, 8, 0.5, 16), (64, 8, 0.3, 24), (64, 8, 2, 4), (4, 8, 1, 4), (64, 0, 1, 0)],
)
def test_worker_slots_pack_fractions_within_one_gpu(cpus, gpus, per_worker, slots):
    assert worker_slots(cpus, gpus, per_worker) == slots


def test_a_block_that_loses_three_workers_stops_the_run_naming_it(monkeypatch):
    monkeypatch.setattr(ray, "kill", lambda actor: None)
    monkeypatch.setattr(Dispatcher, "start_worker", lambda self: self.workers.append(Worker(len(self.workers), None)))
    block = Block(3, [10, 11, 12, 13], {12, 13})  # 10 and 11 are journaled already
    dispatcher = Dispatcher(None, None, 0, [Block(4, [14, 15], {14, 15})], on_result=None, pin_batch_size=None)
    for attempt in range(1, 3):
        worker = Worker(len(dispatcher.workers), None, info={"pid": 1}, block=block)
        dispatcher.workers.append(worker)
        dispatcher.replace(worker, RuntimeError("killed"))
        assert dispatcher.pending[0] is block and block.todo == {12, 13} and block.failures == attempt
        assert worker.lost == "RuntimeError: killed" and dispatcher.workers[-1].number == worker.number + 1
        dispatcher.pending.popleft()
    with pytest.raises(WorkersLost, match=r"block 3 \(4 queries, rows 10\.\.13\) lost 3 Ray workers; last: .*killed"):
        dispatcher.replace(Worker(9, None, info={"pid": 1}, block=block), RuntimeError("killed"))


def test_a_worker_with_other_library_versions_is_refused():
    with pytest.raises(InputError, match="has torch .*, the driver 0.0"):
        ray_engine._check_same_code_and_libraries({"torch": "0.0"}, RESULT_CODE)


class ScorerThatFails:
    """Finishes the block's first query, then fails as an accelerator would (after `fail_after`)."""

    def __init__(self, fail_after: int | None):
        self.fail_after = fail_after

    def run(self, block, todo):
        for number, query in enumerate(block):
            if number == self.fail_after:
                raise GenerationAborted("the accelerator failed")
            time.sleep(0.01)
            yield QueryResult(query, {"pointer_candidates": []})


@pytest.mark.parametrize("fail_after", [None, 1])
def test_a_worker_hands_back_every_finished_query_then_the_error_that_stopped_it(fail_after):
    worker = BlockWorker()
    worker.scorer = ScorerThatFails(fail_after)
    worker.begin([5, 6, 7], {5, 6, 7})
    collected, done = [], False
    try:
        while not done:
            results, done = worker.collect()
            collected += [r.query_idx for r in results]
    except GenerationAborted:
        assert fail_after == 1 and collected == [5]
    else:
        assert fail_after is None and collected == [5, 6, 7]


def test_a_local_journal_resumes_on_ray_with_its_pinned_batch_size_and_threads(
    cluster, local_output, rl_inputs, tmp_path, one_torch_thread
):
    """Started by the local engine (1 thread, batch 16, as `local_output`) and stopped after 3 queries (its
    journal cut there, as a kill leaves it), resumed on Ray with another --batch_size: the workers score
    with the journal's pins, and the bytes are the local run's."""
    output = tmp_path / "rl.json"
    shutil.copytree(local_output.with_name("rl.json.journal"), tmp_path / "rl.json.journal")
    (journal,) = (tmp_path / "rl.json.journal").glob("*/shard-0-of-1.jsonl")
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) > 4, "the local run should have journaled more than 3 queries"
    journal.write_bytes(b"".join(lines[:4]))
    generate_rl_data.main(ray_argv(rl_inputs, output, cluster, "--num_workers", "1", "--batch_size", "5"))
    assert output.read_bytes() == local_output.read_bytes()
    workers = json.loads(output.with_name("rl.json.meta.json").read_text())["engine"]["workers"]
    assert [(w["batch_size"], w["torch_threads"]) for w in workers] == [(16, 1)]

    # A journal that pinned 2 threads (a local run on a 2-core machine) is resumed with 2 per worker.
    header, *records = journal.read_bytes().splitlines(keepends=True)
    pinned = json.loads(header)
    pinned["pinned"]["torch_threads"] = 2
    journal.write_bytes(json.dumps(pinned, separators=(",", ":")).encode() + b"\n" + b"".join(records[:-2]))
    generate_rl_data.main(ray_argv(rl_inputs, output, cluster, "--num_workers", "1"))
    workers = json.loads(output.with_name("rl.json.meta.json").read_text())["engine"]["workers"]
    assert [(w["batch_size"], w["torch_threads"]) for w in workers] == [(16, 2)]


def test_an_open_gpu_batch_size_is_chosen_by_one_worker_before_the_others_load(monkeypatch):
    """On CUDA each worker would size its batch from its own free memory: the first decides for all."""
    from dataclasses import replace

    from lever_lm.rl.engines.ray import WorkerSpec

    monkeypatch.setattr(Dispatcher, "start_worker", lambda self: self.workers.append(Worker(len(self.workers), None)))
    spec = WorkerSpec("qwen", None, {}, None, None, "cuda:0", 1, RESULT_CODE, {})
    pinned = []
    dispatcher = Dispatcher(None, spec, 1, [], None, pinned.append, load_one_first=True)
    dispatcher.start_workers(3)
    assert len(dispatcher.workers) == 1
    dispatcher.ready(dispatcher.workers[0], {"node": "n", "pid": 1, "gpus": ["0"], "batch_size": 24, "load_seconds": 1})
    assert pinned == [24] and dispatcher.spec == replace(spec, batch_size=24) and len(dispatcher.workers) == 3
    eager = Dispatcher(None, replace(spec, device="cpu"), 0, [], None, pinned.append)
    eager.start_workers(3)
    assert len(eager.workers) == 3
