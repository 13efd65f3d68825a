"""Validation tells a run's real output from an edited, truncated, mismatched or made-up one.

A forger here is careful: after editing the data file it recomputes what the sidecar says about
it (the sha256, the counts), as a user who knows the format could. Each check must still catch
its case; only re-running the VQA model (`--audit`) catches a file made up from scratch.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from lever_lm.errors import InputError
from lever_lm.io import read_json
from lever_lm.models.v3 import generate_rl_data
from lever_lm.rl.audit import AuditSettings
from lever_lm.rl.meta import read_meta
from lever_lm.rl.records import MethodTotals
from lever_lm.rl.validate import ValidationOutputs, main, run_validation
from lever_lm.vqa.metric import prepare_answers, score_prediction
from lever_lm.vqa.relevance import relevance

LIMIT = 8


@pytest.fixture(scope="module")
def run(rl_inputs, tmp_path_factory) -> Path:
    """A run of the first 8 queries, scored by the tiny VLM: its data file, sidecar and journal."""
    output = tmp_path_factory.mktemp("run") / "rl.json"
    generate_rl_data.main(rl_inputs.generator_argv(output, "--limit", str(LIMIT)))
    return output


@pytest.fixture
def copy_of_run(run, tmp_path) -> Path:
    """The data file and its sidecar copied (the sidecar still names the run's journal)."""
    for name in (run.name, run.name + ".meta.json"):
        shutil.copy2(run.parent / name, tmp_path / name)
    return tmp_path / run.name


def validate(rl_inputs, path: Path, audit: int = 0):
    outputs = ValidationOutputs(path.parent / "metrics.json", path.parent / "breakdown.json", path.parent / "plots")
    return run_validation(
        path, rl_inputs.beam_data, rl_inputs.dataset_paths(), outputs, audit=AuditSettings(audit, seed=0)
    )


def forge(path: Path, data: dict, drop_journal: bool = False, **run_edits) -> None:
    """Write `data` as the generator writes it, and make the sidecar agree: its sha256 and counts."""
    body = ",".join(f"\n{json.dumps(key)}: {json.dumps(entry, ensure_ascii=False)}" for key, entry in data.items())
    path.write_text("{" + body + "\n}\n", encoding="utf-8")
    meta_path = path.with_name(path.name + ".meta.json")
    meta = read_json(meta_path)
    totals = MethodTotals()
    for entry in data.values():
        totals.add(entry)
    meta["counts"] |= {k: v for k, v in totals.as_dict().items() if k != "duplicates_dropped"}
    meta["data_sha256"] = __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    meta["run"] |= run_edits
    if drop_journal:
        meta["journals"] = [str(path.parent / "moved" / "shard-0-of-1.jsonl")]
    meta_path.write_text(json.dumps(meta))


def test_the_run_validates_with_its_journal_and_an_audit(rl_inputs, copy_of_run):
    report = validate(rl_inputs, copy_of_run, audit=6)
    assert report.metrics["queries"] == LIMIT
    assert report.journal == f"{LIMIT} entries checked against 1 journal file(s)"
    candidates = sum(len(e["pointer_candidates"]) for e in read_json(copy_of_run).values())
    assert report.audit == {"candidates": 6, "of": candidates, "seed": 0, "answers_differ": 0, "accuracies_differ": 0}
    breakdown = read_json(copy_of_run.parent / "breakdown.json")
    assert breakdown["provenance"] == {"journal": report.journal, "audit": report.audit}


def test_a_missing_sidecar_is_refused(rl_inputs, copy_of_run):
    copy_of_run.with_name("rl.json.meta.json").unlink()
    with pytest.raises(InputError, match="the run's meta sidecar is missing"):
        validate(rl_inputs, copy_of_run)


def test_a_sidecar_from_another_run_beside_the_data_is_refused(rl_inputs, run, copy_of_run, tmp_path):
    """As after `dvc checkout` of the data alone: another run (the first 4 queries, same journal) left its sidecar."""
    other = tmp_path / "other" / "rl.json"
    journal_dir = run.with_name("rl.json.journal")
    generate_rl_data.main(rl_inputs.generator_argv(other, "--limit", "4", "--journal_dir", str(journal_dir)))
    shutil.copy2(other.with_name("rl.json.meta.json"), copy_of_run.with_name("rl.json.meta.json"))
    with pytest.raises(InputError, match="its sha256 is not the one its meta sidecar rl.json.meta.json records"):
        validate(rl_inputs, copy_of_run)


def test_a_truncated_file_with_an_edited_limit_is_refused(rl_inputs, copy_of_run):
    data = read_json(copy_of_run)
    truncated = dict(list(data.items())[:4])
    copy_of_run.write_text(json.dumps(truncated))
    meta_path = copy_of_run.with_name("rl.json.meta.json")
    meta = read_json(meta_path)
    meta["run"]["limit"] = 4
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="its sha256 is not the one"):
        validate(rl_inputs, copy_of_run)


def _drop_as_unscorable(path: Path, count: int) -> list[str]:
    data = read_json(path)
    dropped = list(data)[1 : 1 + count]
    for key in dropped:
        del data[key]
    meta_path = path.with_name("rl.json.meta.json")
    meta = read_json(meta_path)
    meta["counts"]["unscorable_queries"] = {key: "the query's image cannot be read: truncated" for key in dropped}
    meta_path.write_text(json.dumps(meta))
    return dropped, data


def test_deleted_queries_listed_as_unscorable_are_refused(rl_inputs, copy_of_run):
    dropped, data = _drop_as_unscorable(copy_of_run, 3)
    forge(copy_of_run, data)
    with pytest.raises(InputError) as error:
        validate(rl_inputs, copy_of_run)
    for key in dropped:
        assert f"query {key} is listed as unscorable in the meta sidecar, but its image reads fine" in str(error.value)
        assert f"query {key} is listed as unscorable, but the journal does not say so" in str(error.value)


def test_without_the_journal_the_images_of_unscorable_queries_are_still_read(rl_inputs, copy_of_run):
    dropped, data = _drop_as_unscorable(copy_of_run, 3)
    forge(copy_of_run, data, drop_journal=True)
    with pytest.raises(InputError, match=f"query {dropped[0]} is listed as unscorable in the meta sidecar, but its"):
        validate(rl_inputs, copy_of_run)


def _fabricated(data: dict, eval_mode: str = "always") -> dict:
    """Every answer set to the query's most common human answer, every score recomputed to match."""
    data = copy.deepcopy(data)
    for entry in data.values():
        answers = entry["query"]["gt_answers_raw"]
        common = Counter(answers).most_common(1)[0][0]
        accuracy = score_prediction(common, prepare_answers(answers, eval_mode))
        for c in entry["pointer_candidates"]:
            c |= {"vqa_raw_generation": common, "vqa_pred_answer": common, "vqa_acc_score": accuracy}
            c |= {"vqa_correct": int(accuracy > 0), **relevance(common, answers)}
    return data


def test_an_entry_that_differs_from_its_journal_line_is_refused(rl_inputs, copy_of_run):
    data = read_json(copy_of_run)
    key = list(data)[2]
    data[key] = _fabricated({key: data[key]})[key]
    forge(copy_of_run, data)
    with pytest.raises(InputError, match=f"query {key} differs from its journaled result"):
        validate(rl_inputs, copy_of_run)


def test_a_fabricated_file_passes_every_check_but_the_audit(rl_inputs, copy_of_run):
    fabricated = _fabricated(read_json(copy_of_run))
    forge(copy_of_run, fabricated, drop_journal=True)
    report = validate(rl_inputs, copy_of_run)  # consistent in itself, and no journal to compare with
    assert report.journal == "not found" and report.metrics["accuracy"] > 0.9
    with pytest.raises(
        InputError, match=r"audit failed: the run's VQA model, re-run on 16 of \d+ candidates \(seed 0\)"
    ):
        validate(rl_inputs, copy_of_run, audit=16)


def test_the_stage_prints_the_audit(rl_inputs, copy_of_run, capsys):
    paths = rl_inputs.dataset_paths()
    main([
        "--rl_data", str(copy_of_run), "--beam_data", str(rl_inputs.beam_data),
        "--train_ques_path", str(paths.train_ques_path), "--train_ann_path", str(paths.train_ann_path),
        "--train_image_root", str(paths.train_image_root), "--metrics", str(copy_of_run.parent / "m.json"),
        "--breakdown", str(copy_of_run.parent / "b.json"), "--plots", str(copy_of_run.parent / "plots"),
        "--audit", "3", "--audit_seed", "5",
    ])  # fmt: skip
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"valid: {LIMIT} queries")
    assert "audit: the VQA model re-run on 3 of" in line and "(seed 5), 0 answers and 0 accuracies differ" in line


def test_another_model_cannot_audit(rl_inputs, copy_of_run, tmp_path):
    other_model = tmp_path / "vlm"
    shutil.copytree(rl_inputs.vlm, other_model)
    (other_model / "extra.txt").write_text("not the run's model")
    meta_path = copy_of_run.with_name("rl.json.meta.json")
    meta = read_json(meta_path)
    meta["request"]["vqa_model_path"] = str(other_model)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="the VQA model here differs from the run's in model"):
        validate(rl_inputs, copy_of_run, audit=2)


def test_a_sidecar_whose_fingerprint_is_not_its_settings_is_refused(rl_inputs, copy_of_run):
    meta_path = copy_of_run.with_name("rl.json.meta.json")
    meta = read_json(meta_path)
    meta["settings"]["eval_mode"] = "official"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="is not the hash of its settings"):
        read_meta(copy_of_run)


def test_validation_refuses_inputs_the_run_did_not_read(rl_inputs, copy_of_run, tmp_path):
    beam = read_json(rl_inputs.beam_data)
    other = tmp_path / "beam.json"
    other.write_text(json.dumps(beam, indent=1))  # the same content, other bytes
    outputs = ValidationOutputs(tmp_path / "m.json", tmp_path / "b.json", tmp_path / "plots")
    with pytest.raises(InputError, match="not the beam_data the run read"):
        run_validation(copy_of_run, other, rl_inputs.dataset_paths(), outputs)


def test_a_file_of_the_earlier_layout_is_told_so_first(rl_inputs, copy_of_run):
    data = read_json(copy_of_run)
    for entry in data.values():
        entry["query"]["candidate_pool_ids"] = list(range(16))
    copy_of_run.write_text(json.dumps(data))
    copy_of_run.with_name("rl.json.meta.json").unlink()  # an old run's sidecar would not do either
    with pytest.raises(InputError, match=f"{LIMIT} queries hold candidate_pool_ids inside 'query'"):
        validate(rl_inputs, copy_of_run)
