"""Inputs read once: identical embedding files give one tensor, scoring files equal to the training
files are not parsed again, and Ray's object store carries arrays that the workers share."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lever_lm.data import vqa
from lever_lm.models.v3 import generate_rl_data
from lever_lm.rl import inputs as inputs_module
from lever_lm.rl.cli import request_from_args
from lever_lm.rl.inputs import load_inputs


def request(rl_inputs, output: Path, *extra: str):
    argv = [
        "--sft_ckpt", str(rl_inputs.sft_ckpt), "--beam_data", str(rl_inputs.beam_data),
        "--output_path", str(output), "--query_emb", str(rl_inputs.query_emb), "--cand_emb", str(rl_inputs.cand_emb),
        "--vqa_model_path", str(rl_inputs.vlm), *rl_inputs.dataset_flags(), "--no_progress", *extra,
    ]  # fmt: skip
    return request_from_args(generate_rl_data.build_parser().parse_args(argv))


def refuse_answer_tables(monkeypatch) -> None:
    def refuse(path):
        raise AssertionError(f"{path} was parsed although the training annotations hold the same bytes")

    monkeypatch.setattr(vqa.AnswerTable, "load", refuse)


def test_identical_embedding_files_are_read_into_one_tensor(rl_inputs, tmp_path):
    loaded = load_inputs(request(rl_inputs, tmp_path / "rl.json"))
    assert loaded.cand_emb is loaded.query_emb
    other = tmp_path / "cand.pt"
    torch.save(torch.load(rl_inputs.cand_emb) * 2, other)
    separate = load_inputs(request(rl_inputs, tmp_path / "rl.json", "--cand_emb", str(other)))
    assert separate.cand_emb is not separate.query_emb
    assert torch.equal(separate.cand_emb, loaded.query_emb * 2)


def test_scoring_files_with_the_training_files_bytes_are_not_parsed_again(rl_inputs, tmp_path, monkeypatch):
    plain = load_inputs(request(rl_inputs, tmp_path / "rl.json"))
    copies = tmp_path / "copies"
    copies.mkdir()
    questions = str(shutil.copy(rl_inputs.vqa / "OpenEnded_mscoco_train2014_questions.json", copies / "q.json"))
    annotations = str(shutil.copy(rl_inputs.vqa / "mscoco_train2014_annotations.json", copies / "a.json"))
    refuse_answer_tables(monkeypatch)
    monkeypatch.setattr(inputs_module, "_check_questions_file", lambda path: pytest.fail(f"{path} was read"))
    same = load_inputs(
        request(rl_inputs, tmp_path / "rl.json", "--val_ques_path", questions, "--val_ann_path", annotations)
    )
    assert same.scoring_answers == plain.scoring_answers


def test_a_scoring_file_with_other_answers_is_read(rl_inputs, tmp_path):
    path = tmp_path / "a.json"
    data = json.loads((rl_inputs.vqa / "mscoco_train2014_annotations.json").read_text())
    plain = load_inputs(request(rl_inputs, tmp_path / "rl.json"))
    query = plain.queries[0]
    question_id = plain.dataset[query].question_id
    for record in data["annotations"]:
        if record["question_id"] == question_id:
            record["answers"] = [{"answer": "zebra", "answer_id": i + 1} for i in range(10)]
    path.write_text(json.dumps(data))
    questions = str(rl_inputs.vqa / "OpenEnded_mscoco_train2014_questions.json")
    other = load_inputs(
        request(rl_inputs, tmp_path / "rl.json", "--val_ques_path", questions, "--val_ann_path", str(path))
    )
    assert other.scoring_answers[query] == ("zebra",) * 10
    assert other.scoring_answers[plain.queries[1]] == plain.scoring_answers[plain.queries[1]]


def test_ray_object_store_form_shares_the_embeddings_and_the_columns(rl_inputs, tmp_path):
    ray_engine = pytest.importorskip("lever_lm.rl.engines.ray")
    loaded = load_inputs(request(rl_inputs, tmp_path / "rl.json"))
    stored = ray_engine.for_object_store(loaded)
    assert isinstance(stored.query_emb, np.ndarray) and stored.cand_emb is stored.query_emb
    buffers = []  # what Ray keeps out of band, in shared memory: every large array
    payload = pickle.dumps(stored, protocol=5, buffer_callback=buffers.append)
    sizes = sorted(memoryview(b).nbytes for b in buffers)
    assert sizes.count(loaded.query_emb.numel() * 4) == 1  # the embeddings, once
    assert loaded.dataset.columns.questions.data.nbytes in sizes  # the data set's columns
    assert loaded.query_emb.numpy().tobytes()[:64] not in payload  # nothing of them in band
    worker = ray_engine.from_object_store(pickle.loads(payload, buffers=buffers))
    assert worker.cand_emb is worker.query_emb and torch.equal(worker.query_emb, loaded.query_emb)
    assert [worker.dataset[i] for i in range(5)] == [loaded.dataset[i] for i in range(5)]
