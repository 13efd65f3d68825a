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
    Pins,
    list_journals,
    main,
    prune_journals,
    read_index,
    read_pins,
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


def _record_line(record: dict, spec: JournalSpec = SPEC) -> bytes:
    from lever_lm.rl.journal import record_line

    return (record_line(record, spec.binding) + "\n").encode()


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
    with Journal.open(tmp_path / "fewer", fewer) as journal:
        journal.pin(Pins(batch_size=4))
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


# -- lines are bound to their run and shard -------------------------------------------------------


@pytest.mark.parametrize(
    "other",
    [
        JournalSpec({"x": 2}, SPEC.queries, SPEC.rules),  # another run: another model, seed or eval mode
        JournalSpec(SETTINGS, SPEC.queries, SPEC.rules, shard_id=1, num_shards=2),  # another shard of this run
    ],
)
def test_a_line_copied_from_another_journal_is_refused_and_repair_drops_it(tmp_path: Path, capsys, other):
    with Journal.open(tmp_path / "other", other) as journal:
        journal.append(2, entry(2, answer="from another run"))
        foreign = journal.path.read_bytes().splitlines(keepends=True)[1]
    with Journal.open(tmp_path / "mine", SPEC) as journal:
        journal.append(1, entry(1))
        path = journal.path
    path.write_bytes(path.read_bytes() + foreign)  # `tail -n +2 other.jsonl >> mine.jsonl`
    with pytest.raises(InputError, match="line 3 is corrupt .checksum mismatch.*another run's journal") as error:
        Journal.open(tmp_path / "mine", SPEC)
    assert error.value.path == str(path)
    main(["repair", str(path)])
    assert capsys.readouterr().out.strip() == "dropped 1 bad line(s): 3"
    with Journal.open(tmp_path / "mine", SPEC) as journal:
        assert journal.done() == {1}  # query 2 is scored again, by this run


def test_a_journal_of_the_older_format_is_refused_with_the_reason(tmp_path: Path, capsys):
    with Journal.open(tmp_path / "fp", SPEC) as journal:
        journal.append(1, entry(1))
        path = journal.path
    header, *records = path.read_bytes().splitlines(keepends=True)
    old = {**json.loads(header), "version": 2}
    old.pop("pinned")
    path.write_bytes(json.dumps(old, separators=(",", ":")).encode() + b"\n" + b"".join(records))
    with pytest.raises(InputError, match="format version 2 .an older lever_lm's.*this program reads 3"):
        Journal.open(tmp_path / "fp", SPEC)
    assert "format version 2" in list_journals(tmp_path)[0]["shards"]["shard-0-of-1.jsonl"]
    with pytest.raises(SystemExit) as refused:
        main(["repair", str(path)])
    assert refused.value.code == 2 and "delete it" in capsys.readouterr().err


# -- the header pins batch size and threads -------------------------------------------------------


def test_the_header_is_written_with_the_first_runs_pins_and_kept(tmp_path: Path):
    with Journal.open(tmp_path, SPEC) as journal:
        assert journal.pins is None and not journal.path.exists(), "no header before the pins are known"
        journal.pin(Pins(batch_size=16, torch_threads=2))
        journal.append(1, entry(1))
    assert lines(journal.path)[0]["pinned"] == {"batch_size": 16, "torch_threads": 2}
    with Journal.open(tmp_path, SPEC) as journal:
        assert journal.pins == Pins(16, 2)
        journal.pin(Pins(16, 2))  # the same: fine
        with pytest.raises(InputError, match="written with batch size 16, 2 torch thread.*scores with batch size 5"):
            journal.pin(Pins(5, 2))
    assert read_index(journal.path, SPEC).pins == Pins(16, 2)


@pytest.mark.parametrize("pinned", [{"batch_size": 0, "torch_threads": None}, {"batch_size": 4}, [4, 1]])
def test_malformed_pins_are_a_corrupt_header(tmp_path: Path, pinned):
    with Journal.open(tmp_path, SPEC) as journal:
        journal.pin(Pins(4, 1))
    header = {**lines(journal.path)[0], "pinned": pinned}
    journal.path.write_text(json.dumps(header) + "\n")
    with pytest.raises(InputError, match="line 1 is corrupt .the header's 'pinned'"):
        Journal.open(tmp_path, SPEC)


# -- nesting too deep for the parser --------------------------------------------------------------


def test_a_deeply_nested_line_is_one_error_line_everywhere(tmp_path: Path, capsys):
    with Journal.open(tmp_path / "fp", SPEC) as journal:
        journal.append(1, entry(1))
        path = journal.path
    path.write_bytes(path.read_bytes() + b"[" * 100_000 + b"\n" + _record_line(_record(2)))
    with pytest.raises(InputError, match="line 3 is corrupt .nested deeper than"):
        Journal.open(tmp_path / "fp", SPEC)
    main(["list", str(tmp_path)])
    assert "corrupt: line 3 is corrupt (nested deeper than" in capsys.readouterr().out
    main(["repair", str(path)])
    assert capsys.readouterr().out.strip() == "dropped 1 bad line(s): 3"
    deep_header = tmp_path / "deep" / "shard-0-of-1.jsonl"
    deep_header.parent.mkdir()
    deep_header.write_bytes(b"{" * 100_000 + b"\n")
    main(["list", str(tmp_path)])
    assert "deep  " in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(["repair", str(deep_header)])
    assert refused.value.code == 2 and "line 1 is corrupt" in capsys.readouterr().err


def _record(query_idx: int) -> dict:
    return {"query_idx": query_idx, "attempt": 0, "entry": entry(query_idx), "stats": {}}


def test_read_pins_reads_the_header_alone(tmp_path: Path):
    with Journal.open(tmp_path, SPEC) as journal:
        journal.pin(Pins(8, None))
        journal.append(1, entry(1))
    assert read_pins(journal.path) == Pins(8, None)


def test_a_merge_of_shards_with_other_pins_warns(caplog):
    from lever_lm.rl.generate import RunSummary, _note_shard_pins

    same = RunSummary("fp", Path("j"), 4, 0)
    _note_shard_pins([Pins(16, 2), Pins(16, 2)], same)
    assert (same.batch_size, same.torch_threads) == (16, 2) and not caplog.text
    other = RunSummary("fp", Path("j"), 4, 0)
    _note_shard_pins([Pins(16, None), Pins(32, None)], other)
    assert other.batch_size is None
    assert "shard 0: batch size 16, shard 1: batch size 32" in caplog.text and "--batch_size" in caplog.text
