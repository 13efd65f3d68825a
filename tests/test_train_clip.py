"""Training the demo's tiny CLIP: its pictures find their captions, deterministically, in a standard CLIP directory."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch

from lever_lm.demo.dataset import BACKGROUNDS, render_scene
from lever_lm.demo.train_clip import ClipTrainSettings, all_scenes, as_stored, caption, main, train_demo_clip
from lever_lm.embeddings.export import load_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Past the plateau where every caption is equally likely (loss ln 144 = 4.97), in a few seconds.
SHORT = ClipTrainSettings(steps=100, lr=5e-4)


@pytest.fixture(scope="module")
def base_dir(demo_dir) -> Path:
    return demo_dir / "models" / "clip-tiny"


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    return train_demo_clip(base_dir, tmp_path_factory.mktemp("clip") / "clip-demo", SHORT)


def caption_accuracy(model_dir: Path) -> float:
    """Share of all demo pictures whose nearest caption (by CLIP embedding) is their own."""
    model, processor = load_clip(model_dir, "cpu")
    groups = all_scenes()
    texts = processor.tokenizer([caption(group[0]) for group in groups], padding=True, return_tensors="pt")
    pictures = [as_stored(render_scene(scene)) for group in groups for scene in group]
    pixels = processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**texts).pooler_output
    nearest = (torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T).argmax(1)
    own = torch.arange(len(groups)).repeat_interleave(len(groups[0]))
    return (nearest == own).float().mean().item()


def test_every_picture_the_demo_draws_has_a_caption_of_its_own():
    groups = all_scenes()
    assert len(groups) == 3 * 6 * 4 * 2 and all(len(group) == len(BACKGROUNDS) for group in groups)
    captions = [caption(group[0]) for group in groups]
    assert len(set(captions)) == len(captions)  # no two pictures of a step share a caption
    assert all(len({caption(scene) for scene in group}) == 1 for group in groups)
    assert caption(groups[0][0]) == "one blue circle on the left"
    assert "three blue squares on the right" in captions


def test_training_teaches_the_pictures_to_find_their_captions(trained, base_dir):
    assert len(trained.losses) == SHORT.steps
    assert trained.losses[0] > 4.9 and sum(trained.losses[-10:]) / 10 < 4.0
    before, after = caption_accuracy(base_dir), caption_accuracy(trained.out_dir)
    assert before < 0.03 and after > 0.08  # chance: 1 / 144 = 0.007


def test_the_trained_model_is_the_base_clip_with_new_weights(trained, base_dir):
    out = trained.out_dir
    base_files = {p.name for p in base_dir.iterdir()}
    assert {p.name for p in out.iterdir()} == base_files | {"training_settings.json"}
    for name in base_files - {"model.safetensors"}:
        assert filecmp.cmp(base_dir / name, out / name, shallow=False), name
    assert json.loads((out / "training_settings.json").read_text())["steps"] == SHORT.steps
    model, _ = load_clip(out, "cpu")
    assert type(model).__name__ == "CLIPModel" and not model.training


def test_same_seed_same_weights_other_seed_other_weights(base_dir, tmp_path):
    def weights(seed: int, name: str) -> dict:
        out = train_demo_clip(base_dir, tmp_path / name, ClipTrainSettings(steps=3, seed=seed)).out_dir
        return load_clip(out, "cpu")[0].state_dict()

    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)


def test_command_line_errors_are_one_line_and_write_nothing(base_dir, tmp_path, capsys):
    out = tmp_path / "clip"
    with pytest.raises(SystemExit) as exit_:
        main(["--base_model", str(base_dir), "--out", str(out), "--steps", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "steps" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_:
        main(["--base_model", str(tmp_path / "missing"), "--out", str(out)])
    assert exit_.value.code == 2 and "CLIP model directory not found" in capsys.readouterr().err
