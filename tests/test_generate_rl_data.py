"""The RL data generator end to end on the demo: tiny pointer, tiny Qwen2.5-VL, CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lever_lm.data.beam_data import load_beam_data
from lever_lm.models.v3 import generate_rl_data
from lever_lm.rl.checks import Expectations, load_rl_data, validate_rl_data
from lever_lm.rl.cli import request_from_args
from lever_lm.rl.generate import run_generation
from lever_lm.rl.journal import Journal, JournalSpec
from lever_lm.rl.records import RecordRules
from lever_lm.vqa.metric import vqa_accuracy

SMALL = ["--num_beams", "2", "--temps", "1.0", "--num_samples_per_temp", "1", "--num_random", "1", "--device", "cpu"]
SEED_FLAGS = {
    "--sft_ckpt": None, "--beam_data": None, "--output_path": None, "--query_emb": None, "--cand_emb": None,
    "--vqa_model": "qwen2.5_vl_3B", "--dataset": "okvqa_local", "--num_beams": "5", "--temps": "[1.0, 1.3]",
    "--num_samples_per_temp": "2", "--num_random": "1", "--device": "cuda:0", "--val_ques_path": None,
    "--val_ann_path": None, "--config": None,
}  # fmt: skip


def argv(rl_inputs, output: Path, *extra: str) -> list[str]:
    return [
        "--sft_ckpt", str(rl_inputs.sft_ckpt), "--beam_data", str(rl_inputs.beam_data),
        "--output_path", str(output), "--query_emb", str(rl_inputs.query_emb), "--cand_emb", str(rl_inputs.cand_emb),
        "--vqa_model_path", str(rl_inputs.vlm), *rl_inputs.dataset_flags(), *SMALL, "--no_progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(rl_inputs, tmp_path_factory) -> Path:
    """One uninterrupted single run: the output every other way of running must reproduce."""
    output = tmp_path_factory.mktemp("reference") / "rl.json"
    generate_rl_data.main(argv(rl_inputs, output))
    return output


def _expectations(rl_inputs) -> Expectations:
    beam = load_beam_data(rl_inputs.beam_data, 274)
    return Expectations(beam.query_ids, RecordRules(beam.shot_num, 274))


class NoModel:
    """A backend that must never be asked: every query is journaled already."""

    batch_size = 4

    def prefetch(self, prompts):
        raise AssertionError("the VQA model must not be used when every query is journaled")

    def generate(self, prompts, replies=None):
        raise AssertionError("the VQA model must not be used when every query is journaled")


def run_without_model(args: list[str]) -> None:
    run_generation(request_from_args(generate_rl_data.build_parser().parse_args(args)), backend=NoModel())


def test_output_follows_the_schema_and_the_trainers_rules(reference: Path, rl_inputs):
    data = load_rl_data(reference)
    validate_rl_data(reference, data, _expectations(rl_inputs))  # raises on any violation
    keys = list(data)
    assert all(k.isdigit() for k in keys)
    assert keys == [str(q) for q in load_beam_data(rl_inputs.beam_data, 274).query_ids]
    assert data[keys[0]]["pointer_candidates"], "the first query must have candidates"
    methods = {c["gen_method"] for entry in data.values() for c in entry["pointer_candidates"]}
    assert methods <= {"beam", "sample", "random"} and "beam" in methods
    for entry in data.values():
        gt = entry["query"]["gt_answers_raw"]
        assert len(gt) == 10
        for c in entry["pointer_candidates"]:
            assert c["vqa_acc_score"] == vqa_accuracy(c["vqa_pred_answer"], gt)
            assert c["vqa_eval_mode"] == "vqaEval" and c["eval_failed"] is False
            if c["gen_method"] == "beam":
                assert c["beam_score"] > 0 and c["logprob_score"] < 0 and c["temperature"] is None
            if c["gen_method"] == "sample":
                assert c["temperature"] == 1.0 and c["beam_rank"] is None
    meta = json.loads(reference.with_name("rl.json.meta.json").read_text())
    assert meta["counts"]["queries"] == len(keys)
    assert meta["counts"]["candidates"] == sum(len(e["pointer_candidates"]) for e in data.values())
    assert meta["settings"]["proposal"]["num_beams"] == 2


def test_a_rerun_with_the_same_settings_uses_no_model_and_rewrites_the_same_bytes(reference, rl_inputs):
    before = reference.read_bytes()
    run_without_model(argv(rl_inputs, reference))
    assert reference.read_bytes() == before


def test_kill_9_then_resume_equals_an_uninterrupted_run(reference, rl_inputs, tmp_path):
    output = tmp_path / "rl.json"
    cmd = [
        sys.executable,
        "-m",
        "lever_lm.models.v3.generate_rl_data",
        *argv(rl_inputs, output),
    ]  # the reference's batch size: vqa_gt_prob's last bits depend on it
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal_lines = 0
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        journals = list((tmp_path / "rl.json.journal").glob("*/shard-0-of-1.jsonl"))
        journal_lines = journals[0].read_bytes().count(b"\n") if journals else 0
        if journal_lines >= 2:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 2 <= journal_lines < 12, "the kill should land mid-run"
    assert not output.exists(), "no final JSON before the run ends"
    generate_rl_data.main(argv(rl_inputs, output))
    assert output.read_bytes() == reference.read_bytes()


def test_sharded_and_merged_equals_a_single_run(rl_inputs, tmp_path):
    block = ["--proposal_block", "4"]  # 12 queries -> 3 blocks over 2 shards
    single = tmp_path / "single" / "rl.json"
    generate_rl_data.main(argv(rl_inputs, single, *block))
    sharded = tmp_path / "sharded" / "rl.json"
    with pytest.raises(SystemExit) as refused:  # merging before the shards exist is an error
        generate_rl_data.main(argv(rl_inputs, sharded, *block, "--num_shards", "2", "--merge"))
    assert refused.value.code == 2
    for shard in ("1", "0"):
        generate_rl_data.main(argv(rl_inputs, sharded, *block, "--num_shards", "2", "--shard_id", shard))
        assert not sharded.exists(), "a shard alone writes no final JSON"
    journals = sorted(p.name for p in (tmp_path / "sharded" / "rl.json.journal").glob("*/*.jsonl"))
    assert journals == ["shard-0-of-2.jsonl", "shard-1-of-2.jsonl"]
    generate_rl_data.main(argv(rl_inputs, sharded, *block, "--num_shards", "2", "--merge"))
    assert sharded.read_bytes() == single.read_bytes()


def test_other_settings_start_their_own_journal_and_switching_back_resumes(reference, rl_inputs):
    journal_root = reference.with_name("rl.json.journal")
    first = {p.name for p in journal_root.iterdir()}
    other = reference.with_name("other.json")
    generate_rl_data.main(argv(rl_inputs, other, "--journal_dir", str(journal_root), "--temps", "0.7", "--limit", "2"))
    assert len({p.name for p in journal_root.iterdir()} - first) == 1
    assert len(load_rl_data(other)) == 2
    before = reference.read_bytes()
    run_without_model(argv(rl_inputs, reference))  # back to the first settings: all done already
    assert reference.read_bytes() == before


def test_a_second_writer_on_the_same_journal_is_refused(reference, rl_inputs, capsys):
    meta = json.loads(reference.with_name("rl.json.meta.json").read_text())
    directory = reference.with_name("rl.json.journal") / meta["fingerprint"]
    journal = directory / "shard-0-of-1.jsonl"
    spec = JournalSpec.from_header(json.loads(journal.read_bytes().splitlines()[0]))
    with Journal.open(directory, spec):
        with pytest.raises(SystemExit) as exit_info:
            generate_rl_data.main(argv(rl_inputs, reference))
    assert exit_info.value.code == 2
    assert "in use by another run" in capsys.readouterr().err


def test_help_lists_every_seed_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        generate_rl_data.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in SEED_FLAGS.items():
        assert flag in text
        if default is not None:
            assert f"(default: {default})" in text, flag


@pytest.mark.parametrize(
    "breakage", ["missing_embeddings", "beam_id_out_of_range", "non_positive_temperature", "missing_gpu"]
)
def test_bad_input_stops_before_the_model_loads(breakage, rl_inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lever_lm.rl.generate.load_backend", NoModel)
    args = argv(rl_inputs, tmp_path / "rl.json")
    if breakage == "missing_embeddings":
        args[args.index("--query_emb") + 1] = str(tmp_path / "nowhere.pt")
        expected = "export_embeddings"
    elif breakage == "beam_id_out_of_range":
        beam = json.loads(rl_inputs.beam_data.read_text())
        first = next(iter(beam))
        beam[first]["id_list"][0][0] = 9999
        (tmp_path / "beam.json").write_text(json.dumps(beam))
        args[args.index("--beam_data") + 1] = str(tmp_path / "beam.json")
        expected = "9999"
    elif breakage == "non_positive_temperature":
        args += ["--temps", "0"]
        expected = "temperature must be a finite number > 0"
    else:
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
        args += ["--device", "cuda:0"]
        expected = "CUDA is not available"
    with pytest.raises(SystemExit) as exit_info:
        generate_rl_data.main(args)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "rl.json").exists() and not (tmp_path / "rl.json.journal").exists()


def test_queries_are_scored_with_the_val_annotations_that_hold_them(reference, rl_inputs, tmp_path):
    data = load_rl_data(reference)
    query = data[next(iter(data))]["query"]
    answers = [{"answer": "zebra", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]
    annotations = {
        "annotations": [{"question_id": query["question_id"], "image_id": query["image_id"], "answers": answers}]
    }
    questions = {
        "questions": [
            {"question_id": query["question_id"], "image_id": query["image_id"], "question": query["question"]}
        ]
    }
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    (tmp_path / "q.json").write_text(json.dumps(questions))
    output = tmp_path / "rl.json"
    extra = ["--val_ques_path", str(tmp_path / "q.json"), "--val_ann_path", str(tmp_path / "a.json"), "--limit", "2"]
    generate_rl_data.main(argv(rl_inputs, output, *extra))
    scored = load_rl_data(output)
    entries = list(scored.values())
    assert entries[0]["query"]["gt_answers_raw"] == ["zebra"] * 10
    assert entries[1]["query"]["gt_answers_raw"] == list(data.values())[1]["query"]["gt_answers_raw"]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--shot_num", "0"], "--shot_num must be >= 1"),
        (["--temps", "1e-38"], "temperature 1e-38 is below"),
        (["--batch_size", "0"], "--batch_size must be >= 1"),
    ],
)
def test_bad_settings_are_refused_before_any_work(extra, expected, rl_inputs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_rl_data.main(argv(rl_inputs, tmp_path / "rl.json", *extra))
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "rl.json.journal").exists()


def test_unwritable_output_locations_are_refused_at_the_start(rl_inputs, tmp_path, capsys):
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "file").write_text("x")
    for extra, output, expected in [
        ([], tmp_path / "dir.json", "--output_path is a directory"),
        (["--journal_dir", str(tmp_path / "file")], tmp_path / "rl.json", "is a file, not a directory"),
        ([], tmp_path / "file" / "rl.json", "is a file, not a directory"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run_without_model_main(argv(rl_inputs, output, *extra))
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def run_without_model_main(args: list[str]) -> None:
    """The CLI, with a model that must never be used (the run must stop before it)."""
    import lever_lm.rl.generate as generate

    real = generate.load_backend
    generate.load_backend = lambda *a, **k: NoModel()
    try:
        generate_rl_data.main(args)
    finally:
        generate.load_backend = real


def test_no_temperatures_means_no_sampling(rl_inputs, tmp_path):
    from lever_lm.rl.params import argv_from_params

    parser = generate_rl_data.build_parser()
    params = {"temps": [], "num_samples_per_temp": 2, "seed": 3, "unrelated": 1, "gt_prob": True}
    flags = argv_from_params(params, parser)
    assert flags == ["--temps", "--num_samples_per_temp=2", "--seed=3"]
    switches = {"gt_prob": False, "exclude_same_image": True}
    assert argv_from_params(switches, parser) == ["--exclude_same_image", "--no_gt_prob"]
    output = tmp_path / "rl.json"
    generate_rl_data.main(argv(rl_inputs, output, "--limit", "2") + flags)
    methods = {c["gen_method"] for e in load_rl_data(output).values() for c in e["pointer_candidates"]}
    assert "sample" not in methods and "beam" in methods
    generate_rl_data.main(argv(rl_inputs, output, "--limit", "2", "--no_gt_prob"))
    candidates = [c for e in load_rl_data(output).values() for c in e["pointer_candidates"]]
    assert all(c["vqa_gt_prob"] is None for c in candidates) and all("vqa_rel_score" in c for c in candidates)


def test_a_full_disk_is_one_line_and_the_rerun_resumes(reference, rl_inputs, tmp_path, capsys, monkeypatch):
    import errno

    import lever_lm.rl.journal as journal

    real, writes = journal._write_line, []

    def fill_up(handle, text):
        writes.append(text)
        if len(writes) > 4:  # header + 3 queries fit
            raise OSError(errno.ENOSPC, "No space left on device", str(handle.name))
        real(handle, text)

    monkeypatch.setattr(journal, "_write_line", fill_up)
    output = tmp_path / "rl.json"
    with pytest.raises(SystemExit) as exit_info:
        generate_rl_data.main(argv(rl_inputs, output))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "No space left on device" in err and "Traceback" not in err
    assert "3 queries are journaled" in err and not output.exists()
    monkeypatch.setattr(journal, "_write_line", real)
    generate_rl_data.main(argv(rl_inputs, output))
    assert output.read_bytes() == reference.read_bytes()


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_with_one_line_and_a_rerun_resumes(reference, rl_inputs, tmp_path, signum, code):
    output = tmp_path / "rl.json"
    cmd = [
        sys.executable,
        "-m",
        "lever_lm.models.v3.generate_rl_data",
        *argv(rl_inputs, output),
    ]  # the reference's batch size: vqa_gt_prob's last bits depend on it
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        journals = list((tmp_path / "rl.json.journal").glob("*/shard-0-of-1.jsonl"))
        if journals and journals[0].read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code
    assert "interrupted:" in err and "rerun the same command to resume" in err and "Traceback" not in err
    generate_rl_data.main(argv(rl_inputs, output))
    assert output.read_bytes() == reference.read_bytes()


def test_a_limit_below_what_is_journaled_writes_the_first_queries(reference, rl_inputs, tmp_path):
    limited = tmp_path / "limited.json"
    journal = ["--journal_dir", str(reference.with_name("rl.json.journal"))]
    run_without_model(argv(rl_inputs, limited, "--limit", "4", *journal))
    full = load_rl_data(reference)
    assert load_rl_data(limited) == {k: full[k] for k in list(full)[:4]}


def _interrupt_after(cmd: list[str], journal_root: Path, lines: int, env: dict | None = None) -> None:
    """Run the generator in a subprocess and Ctrl-C it once its journal holds `lines` lines."""
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        journals = list(journal_root.glob("*/shard-0-of-1.jsonl"))
        if journals and journals[0].read_bytes().count(b"\n") >= lines:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    assert process.returncode == 130, "the interrupt should land mid-run"


def test_a_resume_keeps_the_batch_size_the_journal_pinned(reference, rl_inputs, tmp_path, caplog):
    """The batch size moves vqa_gt_prob's last bits: a resume with another --batch_size still writes
    the uninterrupted run's bytes, because the journal's header pins the first run's batch size."""
    output = tmp_path / "rl.json"
    cmd = [sys.executable, "-m", "lever_lm.models.v3.generate_rl_data", *argv(rl_inputs, output)]
    _interrupt_after(cmd, tmp_path / "rl.json.journal", lines=4)
    header = json.loads(next((tmp_path / "rl.json.journal").glob("*/shard-0-of-1.jsonl")).read_text().splitlines()[0])
    assert header["pinned"]["batch_size"] == 16 and header["pinned"]["torch_threads"] >= 1
    caplog.set_level("WARNING", logger="lever_lm.rl.generate")
    generate_rl_data.main(argv(rl_inputs, output, "--batch_size", "5"))
    assert output.read_bytes() == reference.read_bytes()
    assert "--batch_size 5 is not used" in caplog.text and "batch size 16" in caplog.text
    meta = json.loads(output.with_name("rl.json.meta.json").read_text())
    assert meta["run"]["batch_size"] == 16 and meta["run"]["torch_threads"] == header["pinned"]["torch_threads"]


def test_a_resume_scores_with_the_thread_count_the_journal_pinned(rl_inputs, tmp_path, monkeypatch):
    import torch

    import lever_lm.rl.generate as generate

    output = tmp_path / "rl.json"
    flags = ["--limit", "4", "--proposal_block", "2"]
    cmd = [sys.executable, "-m", "lever_lm.models.v3.generate_rl_data", *argv(rl_inputs, output, *flags)]
    _interrupt_after(cmd, tmp_path / "rl.json.journal", lines=2, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen, run_local = [], generate.run_local

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return run_local(*args, **kwargs)

    monkeypatch.setattr(generate, "run_local", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generate_rl_data.main(argv(rl_inputs, output, *flags))
        assert seen == [1], "the resume must score with the first run's thread count"
        assert torch.get_num_threads() == 2, "and give the process its own back"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("length", [240, 250])
def test_an_output_name_too_long_for_the_file_system_fails_before_any_work(length, rl_inputs, tmp_path, capsys):
    output = tmp_path / ("x" * (length - 5) + ".json")
    with pytest.raises(SystemExit) as exit_info:
        run_without_model_main(argv(rl_inputs, output))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"the file name ({length} characters) is too long for this file system" in err
    assert list(tmp_path.iterdir()) == [], "nothing is created"


def test_an_accelerator_error_in_the_proposer_stops_with_exit_3(rl_inputs, tmp_path, capsys, monkeypatch):
    from lever_lm.models.v3.proposals import Proposer

    def broken(self, *args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(Proposer, "propose", broken)
    with pytest.raises(SystemExit) as exit_info:
        run_without_model_main(argv(rl_inputs, tmp_path / "rl.json"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 3 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "error: stopped: the accelerator failed (RuntimeError: CUDA error: an illegal memory access" in err


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("which", ["--beam_data", "--train_ann_path", "--train_ques_path", "--sampler_cache"])
def test_json_nested_too_deep_in_any_input_is_one_error_line(which, rl_inputs, tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text('{"annotations": ' + DEEP + "}")
    args = argv(rl_inputs, tmp_path / "rl.json")
    if which == "--sampler_cache":
        args += ["--pool", "per_query", "--pool_size", "8", "--sampler_cache", str(deep)]
    else:
        args[args.index(which) + 1] = str(deep)
    with pytest.raises(SystemExit) as exit_info:
        run_without_model_main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"error: {deep}: not valid JSON: nested deeper than" in err


def test_a_lever_plus_rl_checkpoint_is_a_pointer_for_the_next_round(reference, rl_inputs, tmp_path):
    """The `.pt` that Lever-Plus's grpo_post_train writes (here holding the SFT pointer's weights)
    makes the same data as the SFT checkpoint it came from."""
    import torch

    from lever_lm.models.v2.checkpoint import load_pointer_checkpoint

    pointer = load_pointer_checkpoint(rl_inputs.sft_ckpt)
    rl_checkpoint = tmp_path / "grpo_epoch1.pt"
    torch.save(
        {
            "epoch": 0,
            "phase": "grpo",
            "model_state_dict": pointer.state_dict(),
            "kl_beta": 0.1,
            "metrics": {"grpo_loss": 0.3, "kl": 0.01},
        },
        rl_checkpoint,
    )
    output = tmp_path / "rl.json"
    args = argv(rl_inputs, output, "--limit", "2")
    args[args.index("--sft_ckpt") + 1] = str(rl_checkpoint)
    generate_rl_data.main(args)
    full = load_rl_data(reference)
    assert load_rl_data(output) == {k: full[k] for k in list(full)[:2]}
