"""The journal: durable appends, a checked header and checked lines, retries, repair, one writer, pruning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lever_lm.errors import InputError
from lever_lm.rl.fingerprints import fingerprint
from lever_lm.rl.journal import (
    Journal,
    JournalSpec,
    list_journals,
    main,
    prune_journals,
    read_index,
    repair_file,
)
from lever_lm.rl.records import RecordRules

SETTINGS = {"x": 1}
SPEC = JournalSpec(SETTINGS, queries=(1, 2, 5, 7), rules=RecordRules(shot_num=2, num_items=10))


def entry(query_idx: int, failed: bool = False, answer: str = "red") -> dict:
    candidate = {
        "pointer": [8, 9],
        "gen_method": "random",
        "beam_rank": None,
        "beam_score": None,
        "logprob_score": None,
        "temperature": None,
        "vqa_raw_generation": "" if failed else answer,
        "vqa_pred_answer": "" if failed else answer,
        "vqa_correct": 0,
        "vqa_acc_score": 0.0,
        "vqa_eval_mode": "vqaEval",
        "eval_failed": failed,
        "vqa_gt_prob": None,
        "vqa_rel_token_f1": 0.0,
        "vqa_rel_edit_sim": 0.0,
        "vqa_rel_score": 0.0,
    }
    if failed:
        candidate["eval_error"] = "cannot read image"
    query = {
        "query_id": query_idx,
        "question_id": 100 + query_idx,
        "image_id": 1,
        "question": "q?",
        "gt_answers_raw": ["a"],
    }
    return {"query": query, "pointer_candidates": [candidate]}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def test_fingerprint_ignores_key_order_and_changes_with_values():
    assert fingerprint({"a": 1, "b": [1.0, 1.3]}) == fingerprint({"b": [1.0, 1.3], "a": 1})
    assert fingerprint({"a": 1, "b": [1.0, 1.3]}) != fingerprint({"a": 1, "b": [0.7, 1.0, 1.3]})


def test_append_then_reopen_resumes(tmp_path: Path):
    with Journal.open(tmp_path / "fp", SPEC) as journal:
        journal.append(5, entry(5))
        journal.append(2, entry(2), stats={"duplicates_dropped": {"beam": 1}})
    assert json.loads((tmp_path / "fp" / "settings.json").read_text()) == SETTINGS
    with Journal.open(tmp_path / "fp", SPEC) as journal:
        assert journal.done() == {5, 2}
        journal.append(7, entry(7))
    written = lines(tmp_path / "fp" / "shard-0-of-1.jsonl")
    assert written[0]["fingerprint"] == fingerprint(SETTINGS) and written[0]["queries"] == [1, 2, 5, 7]
    assert [r["query_idx"] for r in written[1:]] == [5, 2, 7]
    assert written[2]["stats"] == {"duplicates_dropped": {"beam": 1}} and written[2]["entry"] == entry(2)


def test_torn_last_line_is_truncated(tmp_path: Path):
    with Journal.open(tmp_path, SPEC) as journal:
        journal.append(1, entry(1))
        path = journal.path
    good = path.read_bytes()
    path.write_bytes(good + b'{"query_idx": 2, "entry": {"v"')
    with Journal.open(tmp_path, SPEC) as journal:
        assert journal.done() == {1}
        journal.append(2, entry(2))
    assert [r.get("query_idx") for r in lines(path)] == [None, 1, 2]
    assert read_index(path, SPEC).offsets[2] == len(good)


@pytest.mark.parametrize(
    "kept_lines, journaled", [(2, [None, 1, 2]), (1, [None, 2]), (0, [None, 2])]
)  # lines that reached the disk: the header and a record, the header, nothing
def test_a_journal_ending_in_nul_bytes_after_a_power_loss_is_truncated(tmp_path: Path, kept_lines, journaled):
    with Journal.open(tmp_path, SPEC) as journal:
        journal.append(1, entry(1))
        journal.append(2, entry(2))
        path = journal.path
    durable = b"".join(path.read_bytes().splitlines(keepends=True)[:kept_lines])
    path.write_bytes(durable + b"\0" * (4096 - len(durable) % 4096))  # the last write's pages never reached the disk
    with Journal.open(tmp_path, SPEC) as journal:
        assert journal.done() == ({1} if kept_lines == 2 else set())
        journal.append(2, entry(2))
    assert path.read_bytes().startswith(durable) and b"\0" not in path.read_bytes()
    assert [r.get("query_idx") for r in lines(path)] == journaled


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda line: b"garbage\n", "line 2 is corrupt"),
        (lambda line: line.replace(b'"q?"', b'"edited?"'), "checksum mismatch"),
    ],
)
def test_a_bad_line_in_the_middle_is_an_error_with_the_way_out(tmp_path: Path, edit, problem):
    with Journal.open(tmp_path, SPEC) as journal:
        journal.append(1, entry(1))
        journal.append(2, entry(2))
        path = journal.path
    header, first, second = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(header + edit(first) + second)
    with pytest.raises(InputError, match=problem) as error:
        Journal.open(tmp_path, SPEC)
    assert "python -m lever_lm.rl.journal repair" in str(error.value)
    assert repair_file(path) == [2]
    with Journal.open(tmp_path, SPEC) as journal:
        assert journal.done() == {2}  # query 1 is recomputed by the next run


def _record_line(record: dict) -> bytes:
    from lever_lm.rl.journal import record_line

    return (record_line(record) + "\n").encode()


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"query_idx": 3, "attempt": 0, "entry": entry(3), "stats": {}}, "not one of this shard's queries"),
        (
            {"query_idx": "2", "attempt": 0, "entry": entry(2), "stats": {}},
            "'query_idx' must be a non-negative integer",
        ),
        (
            {"query_idx": 2, "attempt": 0, "entry": {}, "stats": {}},
            "entry must be an object with a 'pointer_candidates'",
        ),
        ({"query_idx": 2, "attempt": 0, "entry": entry(5), "stats": {}}, "query.query_id is 5"),
        ({"query_idx": 2, "attempt": 0, "entry": {**entry(2), "pointer_candidates": []}, "stats": {}}, "no candidates"),
        ({"query_idx": 1, "attempt": 0, "entry": entry(1), "stats": {}}, "query 1 appears twice"),
    ],
)
def test_lines_that_break_the_schema_or_the_shard_are_refused(tmp_path: Path, record, problem):
    with Journal.open(tmp_path, SPEC) as journal:
        journal.append(1, entry(1))
        path = journal.path
    path.write_bytes(
        path.read_bytes() + _record_line(record) + _record_line({**record, "query_idx": 7, "entry": entry(7)})
    )
    with pytest.raises(InputError, match=problem):
        Journal.open(tmp_path, SPEC)


def test_a_journal_of_other_settings_or_another_shard_is_refused(tmp_path: Path):
    other = JournalSpec({"x": 2}, SPEC.queries, SPEC.rules)
    with Journal.open(tmp_path / "other", other) as journal:
        journal.append(1, entry(1))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "shard-0-of-1.jsonl").write_bytes(journal.path.read_bytes())
    with pytest.raises(InputError, match="written with other settings"):
        Journal.open(tmp_path / "mine", SPEC)
    fewer = JournalSpec(SETTINGS, (1, 2), SPEC.rules)
    with Journal.open(tmp_path / "fewer", fewer):
        pass
    with pytest.raises(InputError, match="another shard or query list"):
        Journal.open(tmp_path / "fewer", SPEC)


def test_failed_evaluations_are_retried_and_the_latest_attempt_counts(tmp_path: Path):
    with Journal.open(tmp_path, SPEC) as journal:
        journal.append(1, entry(1, failed=True))
        journal.append(2, entry(2))
        assert journal.done() == {2} and journal.incomplete() == {1}
    with Journal.open(tmp_path, SPEC) as journal:
        assert journal.incomplete() == {1}
        journal.append(1, entry(1, answer="blue"))
        with pytest.raises(ValueError, match="already final"):
            journal.append(1, entry(1))
    index = read_index(journal.path, SPEC)
    assert index.attempts == {1: 1, 2: 0} and not index.incomplete
    assert lines(journal.path)[-1]["entry"]["pointer_candidates"][0]["vqa_pred_answer"] == "blue"


def test_second_writer_is_refused_even_from_another_process(tmp_path: Path):
    with Journal.open(tmp_path, SPEC):
        with pytest.raises(InputError, match="in use by another run"):
            Journal.open(tmp_path, SPEC)
        code = (
            "import sys; from pathlib import Path; from lever_lm.rl.journal import Journal, JournalSpec\n"
            "from lever_lm.rl.records import RecordRules\nfrom lever_lm.errors import InputError\n"
            f"spec = JournalSpec({SETTINGS!r}, (1, 2, 5, 7), RecordRules(2, 10))\n"
            f"try:\n    Journal.open(Path({str(tmp_path)!r}), spec)\nexcept InputError:\n    sys.exit(3)\n"
        )
        assert subprocess.run([sys.executable, "-c", code]).returncode == 3
    with Journal.open(tmp_path, SPEC):  # released on close
        pass


def test_shards_have_their_own_files(tmp_path: Path):
    spec = JournalSpec(SETTINGS, (4,), SPEC.rules, shard_id=1, num_shards=3)
    with Journal.open(tmp_path, spec) as journal:
        journal.append(4, entry(4))
    assert (tmp_path / "shard-1-of-3.jsonl").is_file()


def test_list_reports_corrupt_journals_and_prune_keeps_the_named_and_the_locked(tmp_path: Path, capsys):
    for name in ("aaa", "bbb", "ccc"):
        with Journal.open(tmp_path / name, SPEC) as journal:
            journal.append(1, entry(1))
    damaged = tmp_path / "bbb" / "shard-0-of-1.jsonl"
    damaged.write_bytes(
        damaged.read_bytes()
        + b"garbage\n"
        + _record_line({"query_idx": 2, "attempt": 0, "entry": entry(2), "stats": {}})
    )
    summaries = {s["fingerprint"]: s["shards"]["shard-0-of-1.jsonl"] for s in list_journals(tmp_path)}
    assert summaries == {
        "aaa": "1 of 4 queries",
        "bbb": "corrupt: line 3 is corrupt (Expecting value: line 1 column 1 (char 0))",
        "ccc": "1 of 4 queries",
    }
    main(["list", str(tmp_path)])
    assert "corrupt" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(["prune", str(tmp_path)])  # neither --keep nor --all
    assert refused.value.code == 2
    with Journal.open(tmp_path / "ccc", SPEC):
        removed = prune_journals(tmp_path, keep={"aaa"})
    assert removed == ["bbb"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aaa", "ccc"]
