"""The evaluation end to end on the demo: validation queries, training ICDs, the tiny Qwen2.5-VL, CPU."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lever_lm.data.dataset_paths import DatasetPaths
from lever_lm.data.embeddings import save_embeddings
from lever_lm.data.vqa import VQADataset
from lever_lm.demo.dataset import Split
from lever_lm.embeddings.export import export_embeddings
from lever_lm.errors import InputError
from lever_lm.evaluation import cli
from lever_lm.evaluation.icl import EvaluationRequest, EvaluationSettings, run_evaluation
from lever_lm.evaluation.statistics import bootstrap_mean, paired_comparison
from lever_lm.models.v2.checkpoint import save_pointer_checkpoint
from lever_lm.models.v2.pointer_selector import PointerSelectorV2
from lever_lm.vqa.backends import load_backend
from lever_lm.vqa.backends.base import Generation
from lever_lm.vqa.metric import vqa_accuracy
from lever_lm.vqa.prompts import FewShotPrompt, Shot

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class Setup:
    demo: Path
    train: VQADataset
    val: VQADataset
    cand_emb: torch.Tensor
    val_emb: torch.Tensor
    pointer: PointerSelectorV2
    request: EvaluationRequest


def _load(split: Split) -> VQADataset:
    return VQADataset.load(split.questions_path, split.annotations_path, split.image_root)


@pytest.fixture(scope="module")
def setup(demo_dir: Path, tmp_path_factory) -> Setup:
    """Embeddings of both splits (tiny CLIP), a pointer with random weights, a request for 6 queries."""
    root = tmp_path_factory.mktemp("evaluation")
    train_split, val_split = Split("train", demo_dir / "vqa"), Split("val", demo_dir / "vqa")
    train, val = _load(train_split), _load(val_split)
    clip = demo_dir / "models" / "clip-tiny"
    cand_emb, val_emb = (export_embeddings(d, clip, progress=False) for d in (train, val))
    save_embeddings(cand_emb, root / "cand.pt")
    save_embeddings(val_emb, root / "val.pt")
    torch.manual_seed(0)
    pointer = PointerSelectorV2(cand_emb.shape[1], hidden_dim=32, num_layers=1, use_gate=True).eval()
    save_pointer_checkpoint(pointer, root / "pointer.ckpt")
    request = EvaluationRequest(
        ckpt=root / "pointer.ckpt",
        cand_emb=root / "cand.pt",
        val_query_emb=root / "val.pt",
        dataset=DatasetPaths(train_split.questions_path, train_split.annotations_path, train_split.image_root),
        val_ques_path=val_split.questions_path,
        val_ann_path=val_split.annotations_path,
        val_image_root=val_split.image_root,
        output_dir=root / "out",
        settings=EvaluationSettings(shot_num=2, num_beams=1, num_random=2, seed=0, num_queries=6),
        vqa_model_path=str(demo_dir / "models" / "qwen2.5-vl-tiny"),
        device="cpu",
        batch_size=4,
        progress=False,
    )
    return Setup(demo_dir, train, val, cand_emb, val_emb, pointer, request)


class CopyTheLastICD:
    """A stand-in VQA model with a known rule: it answers with the last ICD's answer, or 'blue' without ICDs."""

    name = "copy"
    batch_size = 4

    def __init__(self):
        self.prompts: list[FewShotPrompt] = []

    def prefetch(self, prompts):
        pass

    def generate(self, prompts, replies=None):
        self.prompts += prompts
        return [Generation.from_raw(p.shots[-1].answer if p.shots else "blue") for p in prompts]


def greedy_pair(pointer: PointerSelectorV2, query: torch.Tensor, cand: torch.Tensor) -> tuple[int, int]:
    """The pointer's greedy 2-ICD decode over the whole pool, step by step with the reference step."""
    with torch.no_grad():
        pool = pointer.encode_pool(cand)
        state = pointer.encode_queries(query.unsqueeze(0), pool)  # a validation query: no pool row is its own
        first = int(pointer.next_log_probs(state, pool, torch.empty(1, 0, dtype=torch.long)).argmax())
        state = pointer.advance(state, torch.tensor([first]), pool)
        second = int(pointer.next_log_probs(state, pool, torch.tensor([[first]])).argmax())
    return first, second


def top_cosine_pair(query: torch.Tensor, cand: torch.Tensor) -> tuple[int, int]:
    """The lineage's MMTopK for 2 shots: the two most similar items, the most similar last."""
    sims = F.normalize(cand, dim=1) @ F.normalize(query, dim=0)
    best, second = torch.topk(sims, 2).indices.tolist()
    return second, best


def test_every_method_scores_what_its_icds_make_the_model_answer(setup: Setup, tmp_path):
    backend = CopyTheLastICD()
    request = replace(setup.request, output_dir=tmp_path)
    summary = run_evaluation(request, backend=backend)
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == [str(i) for i in range(6)]  # the first 6 validation rows
    expected: dict[str, list[float]] = {"pointer": [], "random": [], "retrieval": [], "zero": []}
    for row in range(6):
        entry, answers = results[str(row)], list(setup.val[row].answers)
        assert entry["question_id"] == setup.val[row].question_id
        pointer = greedy_pair(setup.pointer, setup.val_emb[row], setup.cand_emb)
        retrieval = top_cosine_pair(setup.val_emb[row], setup.cand_emb)
        assert entry["pointer"][0]["icds"] == list(pointer)
        assert entry["retrieval"][0]["icds"] == list(retrieval)
        assert entry["zero"][0]["icds"] == [] and len(entry["random"]) == 2
        for method in expected:
            for sequence in entry[method]:
                icds = sequence["icds"]
                assert len(set(icds)) == len(icds) and all(0 <= i < len(setup.train) for i in icds)
                answer = setup.train[icds[-1]].icd_answer if icds else "blue"
                assert sequence["answer"] == answer
                assert sequence["accuracy"] == vqa_accuracy(answer, answers)
            expected[method].append(sum(s["accuracy"] for s in entry[method]) / len(entry[method]))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == {f"eval_{m}": round(sum(v) / 6, 4) for m, v in expected.items()}
    breakdown = json.loads((tmp_path / "breakdown.json").read_text())
    assert breakdown == summary
    assert breakdown["methods"]["random"]["low"] == round(bootstrap_mean(expected["random"]).low, 4)
    assert breakdown["pointer_vs_retrieval"] == paired_comparison(expected["pointer"], expected["retrieval"]).as_dict()
    assert breakdown["identity"]["files"]["ckpt"]["sha256"]
    # each distinct prompt ran once; every query is a validation item
    assert len(backend.prompts) == breakdown["prompts"] == len({(p.query, p.shots) for p in backend.prompts})
    val_images = {setup.val.image_path(i) for i in range(len(setup.val))}
    assert all(p.query.image in val_images for p in backend.prompts)


def test_with_the_tiny_vlm_zero_shot_is_the_bare_query_and_reruns_are_identical(setup: Setup, tmp_path):
    request = replace(setup.request, settings=replace(setup.request.settings, num_queries=3))
    first = run_evaluation(replace(request, output_dir=tmp_path / "a"))
    run_evaluation(replace(request, output_dir=tmp_path / "b"))
    for name in ("metrics.json", "results.json", "breakdown.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    backend = load_backend("qwen2.5_vl_3B", model_path=request.vqa_model_path, device="cpu", batch_size=4)
    bare = [FewShotPrompt((), Shot(setup.val.image_path(i), setup.val[i].question)) for i in range(3)]
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    zero = []
    for row, generation in enumerate(backend.generate(bare)):
        accuracy = vqa_accuracy(generation.answer, list(setup.val[row].answers))
        assert results[str(row)]["zero"] == [{"icds": [], "answer": generation.answer, "accuracy": accuracy}]
        zero.append(accuracy)
    assert first["headline"]["eval_zero"] == round(sum(zero) / 3, 4)


def test_queries_are_never_training_items(setup: Setup, tmp_path):
    train = setup.request.dataset
    as_val = replace(
        setup.request,
        val_ques_path=train.train_ques_path,
        val_ann_path=train.train_ann_path,
        val_image_root=train.train_image_root,
        val_query_emb=setup.request.cand_emb,
        output_dir=tmp_path,
    )
    with pytest.raises(InputError, match=r"274 of 274 validation questions are also training questions"):
        run_evaluation(as_val, backend=CopyTheLastICD())
    assert not list(tmp_path.iterdir())


def test_cli_runs_the_stage_and_names_a_bad_input(setup: Setup, tmp_path, capsys):
    r = setup.request
    args = [
        "--ckpt", str(r.ckpt), "--cand_emb", str(r.cand_emb), "--val_query_emb", str(r.val_query_emb),
        "--val_ques_path", str(r.val_ques_path), "--val_ann_path", str(r.val_ann_path),
        "--val_image_root", str(r.val_image_root), "--train_ques_path", str(r.dataset.train_ques_path),
        "--train_ann_path", str(r.dataset.train_ann_path), "--train_image_root", str(r.dataset.train_image_root),
        "--vqa_model_path", r.vqa_model_path, "--device", "cpu", "--num_queries", "2", "--num_random", "1",
        "--no_progress",
    ]  # fmt: skip
    cli.main([*args, "--output_dir", str(tmp_path / "ok")])
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert set(metrics) == {"eval_pointer", "eval_random", "eval_retrieval", "eval_zero"}
    with pytest.raises(SystemExit) as exit_:
        cli.main([*args, "--val_query_emb", str(r.cand_emb), "--output_dir", str(tmp_path / "bad")])
    assert exit_.value.code == 2
    assert f"error: {r.cand_emb}: has 274 rows but the data set has {len(setup.val)} items" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_an_rl_checkpoint_of_the_lineage_is_evaluated_as_its_pointer(setup: Setup, tmp_path):
    """Lever-Plus's GRPO trainer saves `.pt` files (the pointer's state dict beside its epoch, phase and
    KL weight; docs/formats.md §3.4): the same weights choose the same ICDs, so every result is equal."""
    rl = tmp_path / "grpo_epoch3.pt"
    state = dict(setup.pointer.state_dict())
    torch.save({"epoch": 2, "phase": "grpo", "model_state_dict": state, "kl_beta": 0.09, "metrics": {}}, rl)
    settings = replace(setup.request.settings, num_queries=3)
    sft = replace(setup.request, settings=settings, output_dir=tmp_path / "sft")
    run_evaluation(sft)
    run_evaluation(replace(sft, ckpt=rl, output_dir=tmp_path / "rl"))
    assert (tmp_path / "rl" / "results.json").read_bytes() == (tmp_path / "sft" / "results.json").read_bytes()


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(InputError, match="num_random must be >= 1"):
        EvaluationSettings(num_random=0)
    with pytest.raises(InputError, match="num_queries must be >= 1"):
        EvaluationSettings(num_queries=0)
