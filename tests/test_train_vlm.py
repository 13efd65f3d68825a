"""Training the demo's tiny Qwen2.5-VL: it learns, deterministically, in the generator's exact prompt format."""

from __future__ import annotations

import filecmp
import json
import random
from pathlib import Path

import pytest
import torch

from lever_lm.data.vqa import VQADataset
from lever_lm.demo.dataset import Split
from lever_lm.demo.train_vlm import (
    IGNORE_INDEX,
    IcdMix,
    IcdSampler,
    PromptEncoder,
    TrainingImages,
    TrainSettings,
    answer_loss,
    main,
    shared_prefix_loss,
    train_demo_vlm,
    training_prompt,
)
from lever_lm.vqa.backends import load_backend
from lever_lm.vqa.backends.image_text_to_text import load_model_and_processor
from lever_lm.vqa.metric import vqa_accuracy
from lever_lm.vqa.model_config import resolve_settings
from lever_lm.vqa.prompts import FewShotPrompt, Shot

# Long enough to beat the random model clearly, short enough for a test (~15 s).
SHORT = TrainSettings(vision_steps=60, steps=80)
TINY = TrainSettings(vision_steps=3, vision_batch_size=8, steps=3, batch_size=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load_split(demo_dir: Path, name: str) -> VQADataset:
    split = Split(name, demo_dir / "vqa")
    return VQADataset.load(split.questions_path, split.annotations_path, split.image_root)


@pytest.fixture(scope="module")
def train_set(demo_dir) -> VQADataset:
    return _load_split(demo_dir, "train")


@pytest.fixture(scope="module")
def val_set(demo_dir) -> VQADataset:
    return _load_split(demo_dir, "val")


@pytest.fixture(scope="module")
def base_dir(demo_dir) -> Path:
    return demo_dir / "models" / "qwen2.5-vl-tiny"


@pytest.fixture(scope="module")
def trained(base_dir, train_set, tmp_path_factory):
    return train_demo_vlm(base_dir, train_set, tmp_path_factory.mktemp("vlm") / "qwen2.5-vl-demo", SHORT)


def _val_accuracy(model_dir: Path, train_set: VQADataset, val_set: VQADataset) -> float:
    """Mean VQA accuracy on the val split, each question with two training ICDs of its question type."""
    rng = random.Random(0)
    by_type: dict = {}
    for row in range(len(train_set)):
        by_type.setdefault(train_set[row].question_type, []).append(row)
    prompts = []
    for row in range(len(val_set)):
        icds = rng.sample(by_type[val_set[row].question_type], 2)
        shots = tuple(Shot(train_set.image_path(i), train_set[i].question, train_set[i].icd_answer) for i in icds)
        prompts.append(FewShotPrompt(shots, Shot(val_set.image_path(row), val_set[row].question)))
    generations = load_backend("qwen2.5_vl_3B", model_path=str(model_dir)).generate(prompts)
    scores = [vqa_accuracy(g.answer, list(val_set[row].answers)) for row, g in enumerate(generations)]
    return sum(scores) / len(scores)


def test_the_trained_model_beats_the_untrained_one_on_held_out_questions(trained, base_dir, train_set, val_set):
    untrained = _val_accuracy(base_dir, train_set, val_set)
    learned = _val_accuracy(trained.out_dir, train_set, val_set)
    assert untrained < 0.05  # random weights: nonsense
    assert learned > untrained + 0.25, (untrained, learned)


def test_both_phases_lower_their_loss(trained):
    assert len(trained.vision_losses) == SHORT.vision_steps and len(trained.losses) == SHORT.steps
    assert sum(trained.vision_losses[-10:]) < 0.9 * sum(trained.vision_losses[:10])
    assert sum(trained.losses[-10:]) < 0.5 * sum(trained.losses[:10])


def test_the_trained_model_is_the_base_architecture_with_the_same_text_files(trained, base_dir):
    out = trained.out_dir
    base_files = sorted(path.name for path in base_dir.iterdir())
    assert sorted(path.name for path in out.iterdir()) == sorted(base_files + ["training_settings.json"])
    for name in base_files:
        same = filecmp.cmp(out / name, base_dir / name, shallow=False)
        assert same == (name != "model.safetensors"), name  # config, tokenizer, processor, template: unchanged
    settings = json.loads((out / "training_settings.json").read_text())
    assert settings["steps"] == SHORT.steps and settings["mix"]["same_answer"] == SHORT.mix.same_answer
    assert not list(out.parent.glob(".*")), "no temporary directory left behind"


def test_same_seed_same_weights_other_seed_other_weights(base_dir, train_set, tmp_path):
    """Bit-identical on one machine (same torch build and thread count): the documented tolerance."""
    first = train_demo_vlm(base_dir, train_set, tmp_path / "a", TINY).out_dir
    again = train_demo_vlm(base_dir, train_set, tmp_path / "b", TINY).out_dir
    other = train_demo_vlm(base_dir, train_set, tmp_path / "c", TrainSettings(**{**TINY.__dict__, "seed": 1})).out_dir
    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in again.iterdir())
    for name in names:
        assert filecmp.cmp(first / name, again / name, shallow=False), name
    assert not filecmp.cmp(first / "model.safetensors", other / "model.safetensors", shallow=False)
    assert not filecmp.cmp(first / "model.safetensors", base_dir / "model.safetensors", shallow=False)
    # Training into an existing directory replaces it whole.
    replaced = train_demo_vlm(base_dir, train_set, tmp_path / "c", TINY).out_dir
    assert filecmp.cmp(replaced / "model.safetensors", first / "model.safetensors", shallow=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a", "b", "c"]


def test_training_prompts_are_token_for_token_the_backends_prompts(base_dir, train_set):
    backend = load_backend("qwen2.5_vl_3B", model_path=str(base_dir))
    encoder = PromptEncoder(backend.processor, backend.settings, TrainingImages(backend.processor, backend.settings))
    tokenizer = backend.tokenizer
    for query, icds in ((5, []), (7, [3]), (11, [20, 1, 9])):
        prompt = training_prompt(train_set, query, icds)
        prepared = backend._prepare(prompt)
        assert encoder.chat_text(prompt) == prepared.text
        ids, labels, images = encoder.prompt_ids(prompt)
        assert ids == backend._encode([prepared])["input_ids"][0].tolist()
        assert len(images) == len(icds) + 1
        learned = [token for token in labels if token != IGNORE_INDEX]
        assert tokenizer.decode(learned) == "".join(train_set[i].icd_answer for i in icds)


def test_answer_targets_end_the_turn(base_dir, train_set):
    model, processor = load_model_and_processor(base_dir, torch.device("cpu"), resolve_settings("chat"))
    images = TrainingImages(processor, resolve_settings("chat"))
    images.freeze(model)
    encoder = PromptEncoder(processor, resolve_settings("chat"), images, train_on_icd_answers=False)
    batch = encoder.encode([training_prompt(train_set, 4, [8])], ["two"])
    labels = [token for token in batch["labels"][0].tolist() if token != IGNORE_INDEX]
    assert processor.tokenizer.decode(labels) == "two<|im_end|>"


def test_shared_prefix_loss_equals_the_full_forward_pass(base_dir, train_set):
    settings = resolve_settings("chat")
    model, processor = load_model_and_processor(base_dir, torch.device("cpu"), settings)
    images = TrainingImages(processor, settings)
    images.freeze(model)
    encoder = PromptEncoder(processor, settings, images)
    # Rows of different lengths (0 to 3 ICDs), so right padding is exercised too.
    prompts = [training_prompt(train_set, q, icds) for q, icds in ((0, []), (1, [2]), (3, [4, 5, 6]), (7, [8, 9]))]
    batch = encoder.encode(prompts, ["red", "3", "left", "yes"])
    gradients = []
    for loss_function in (answer_loss, shared_prefix_loss):
        model.zero_grad()
        loss = loss_function(model, batch)
        loss.backward()
        gradients.append((loss.detach(), [p.grad.clone() for p in model.model.language_model.parameters()]))
    (full, full_grads), (fast, fast_grads) = gradients
    assert torch.allclose(full, fast, atol=1e-5)
    for a, b in zip(full_grads, fast_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_the_icd_mix_decides_where_icds_come_from(train_set):
    rng = random.Random(0)
    same_answer = IcdSampler(train_set, IcdMix(random=0, same_type=0, same_answer=1))
    same_type = IcdSampler(train_set, IcdMix(random=0, same_type=1, same_answer=0))
    for query in range(0, len(train_set), 7):
        item = train_set[query]
        for row in same_type.sample(rng, query, 3):
            assert train_set[row].question_type == item.question_type and row != query
        icds = same_answer.sample(rng, query, 2)
        assert query not in icds and len(set(icds)) == 2
        if len(same_answer.by_answer[(item.question_type, item.icd_answer)]) > 2:
            assert all(train_set[row].icd_answer == item.icd_answer for row in icds)


def test_command_line_errors_are_one_line_and_write_nothing(demo_dir, base_dir, tmp_path, capsys):
    split = Split("train", demo_dir / "vqa")
    flags = ["--train_ques_path", str(split.questions_path), "--train_ann_path", str(split.annotations_path)]
    flags += ["--train_image_root", str(split.image_root)]
    out = tmp_path / "model"
    cases = [
        (["--base_model", str(tmp_path / "missing"), "--out", str(out), *flags], "model directory not found"),
        (
            ["--base_model", str(base_dir), "--out", str(out), *flags, "--steps", "0"],
            "steps must be a positive integer",
        ),
        (["--base_model", str(base_dir), "--out", str(out), *flags, "--icd_mix", "0", "0", "0"], "ICD mix weights"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
        assert not out.exists()
