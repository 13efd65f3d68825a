"""Embedding export on the demo's tiny CLIP: values, row order, batching, the CLI and its errors."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from lever_lm.data.embeddings import load_embeddings
from lever_lm.data.vqa import VQADataset, read_rgb_image
from lever_lm.demo.dataset import Split
from lever_lm.embeddings.export import export_embeddings, load_clip
from lever_lm.models.v3.export_embeddings import main


def _split_args(split: Split) -> list[str]:
    return [
        "--train_ques_path", str(split.questions_path),
        "--train_ann_path", str(split.annotations_path),
        "--train_image_root", str(split.image_root),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def demo(demo_dir):
    split = Split("train", demo_dir / "vqa")
    dataset = VQADataset.load(split.questions_path, split.annotations_path, split.image_root)
    clip_dir = demo_dir / "models" / "clip-tiny"
    embeddings = export_embeddings(dataset, clip_dir, batch_size=64, progress=False)
    return split, dataset, clip_dir, embeddings


def _embed_alone(model, processor, dataset, idx) -> torch.Tensor:
    """The docs/formats.md §3.3 formula for one item, straight through the model."""
    with torch.no_grad():
        pixels = processor.image_processor(images=[read_rgb_image(dataset.image_path(idx))], return_tensors="pt")[
            "pixel_values"
        ]
        image = model.get_image_features(pixel_values=pixels).pooler_output[0]
        tokens = processor.tokenizer([dataset[idx].question], return_tensors="pt")
        text = model.get_text_features(**tokens).pooler_output[0]
    return F.normalize((F.normalize(image, dim=0) + F.normalize(text, dim=0)) / 2, dim=0)


def test_rows_are_unit_float32_and_equal_each_item_embedded_alone(demo):
    _, dataset, clip_dir, embeddings = demo
    assert embeddings.shape == (len(dataset), 32) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(dataset)))
    model, processor = load_clip(clip_dir, "cpu")
    for idx in (0, 1, 100, len(dataset) - 1):
        torch.testing.assert_close(embeddings[idx], _embed_alone(model, processor, dataset, idx), rtol=1e-5, atol=1e-5)
    # two questions on one picture share the image part but not the text part
    same_image = [i for i in range(1, len(dataset)) if dataset[i].image_id == dataset[i - 1].image_id][0]
    assert not torch.allclose(embeddings[same_image], embeddings[same_image - 1])


def test_batch_size_does_not_change_the_result(demo):
    _, dataset, clip_dir, embeddings = demo
    small = export_embeddings(dataset, clip_dir, batch_size=7, progress=False, num_workers=2)
    torch.testing.assert_close(small, embeddings, rtol=1e-5, atol=1e-5)


def test_cli_writes_identical_query_and_candidate_files(demo, tmp_path):
    split, dataset, clip_dir, embeddings = demo
    out = tmp_path / "emb"
    main(
        [
            *_split_args(split),
            "--clip_model",
            str(clip_dir),
            "--output_dir",
            str(out),
            "--device",
            "cpu",
            "--no_progress",
        ]
    )
    query, cand = out / "query_embeddings.pt", out / "candidate_embeddings.pt"
    assert query.read_bytes() == cand.read_bytes()
    torch.testing.assert_close(load_embeddings(query, num_items=len(dataset)), embeddings)
    assert sorted(p.name for p in out.iterdir()) == ["candidate_embeddings.pt", "query_embeddings.pt"]


def test_cli_embeds_the_validation_split_for_the_evaluation(demo, demo_dir, tmp_path, capsys):
    split, _, clip_dir, embeddings = demo
    val_split = Split("val", demo_dir / "vqa")
    val = VQADataset.load(val_split.questions_path, val_split.annotations_path, val_split.image_root)
    val_args = ["--val_ques_path", str(val_split.questions_path), "--val_ann_path", str(val_split.annotations_path)]
    out = tmp_path / "emb"
    common = [*_split_args(split), "--clip_model", str(clip_dir), "--no_progress"]
    main([*common, "--output_dir", str(out), *val_args, "--val_image_root", str(val_split.image_root)])
    torch.testing.assert_close(load_embeddings(out / "candidate_embeddings.pt"), embeddings)
    expected = export_embeddings(val, clip_dir, progress=False)
    torch.testing.assert_close(load_embeddings(out / "val_query_embeddings.pt", num_items=len(val)), expected)
    with pytest.raises(SystemExit) as exit_:
        main([*common, "--output_dir", str(tmp_path / "partial"), *val_args])
    assert exit_.value.code == 2 and "needs all of --val_ques_path, --val_ann_path, --val_image_root" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "partial").exists()


def test_cli_resolves_the_preset_from_the_environment(demo, tmp_path, monkeypatch):
    split, _, clip_dir, embeddings = demo
    monkeypatch.setenv("OKVQA_PATH", str(split.root))  # the demo uses the okvqa_local layout
    monkeypatch.setenv("COCO_PATH", str(split.root))
    monkeypatch.chdir(tmp_path)
    main(["--dataset", "okvqa_local", "--clip_model", str(clip_dir), "--output_dir", "emb", "--no_progress"])
    torch.testing.assert_close(load_embeddings(tmp_path / "emb" / "query_embeddings.pt"), embeddings)


def test_cli_reads_the_dataset_section_of_the_config(demo, tmp_path):
    split, _, clip_dir, embeddings = demo
    config = tmp_path / "config.yaml"
    config.write_text(
        f"dataset:\n  train_ques_path: {split.questions_path}\n  train_ann_path: {split.annotations_path}\n"
        f"  train_image_root: {split.image_root}\nvqa_model:\n  batch_size: 2\n"
    )
    main(["--config", str(config), "--clip_model", str(clip_dir), "--output_dir", str(tmp_path / "e"), "--no_progress"])
    torch.testing.assert_close(load_embeddings(tmp_path / "e" / "candidate_embeddings.pt"), embeddings)


def test_missing_image_is_a_clear_error_and_nothing_is_written(demo, tmp_path, capsys):
    split, dataset, clip_dir, _ = demo
    copy = Split("train", tmp_path / "vqa")
    shutil.copytree(split.root, copy.root, ignore=shutil.ignore_patterns("val2014"))
    missing = copy.image_path(dataset[5].image_id)
    missing.unlink()
    out = tmp_path / "emb"
    with pytest.raises(SystemExit) as exit_:
        main([*_split_args(copy), "--clip_model", str(clip_dir), "--output_dir", str(out), "--no_progress"])
    assert exit_.value.code == 2
    assert f"error: {missing}: image file not found" in capsys.readouterr().err
    assert not out.exists()


def test_unreadable_model_directory_is_a_clear_error(demo, demo_dir, tmp_path, capsys):
    split, _, _, _ = demo
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{broken")
    cases = [
        (broken, "cannot load a CLIP model and processor: OSError"),
        (tmp_path / "absent", "CLIP model directory not found"),
        (demo_dir / "models" / "qwen2.5-vl-tiny", "is a 'qwen2_5_vl' model, not CLIP"),
    ]
    for model_dir, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(
                [
                    *_split_args(split),
                    "--clip_model",
                    str(model_dir),
                    "--output_dir",
                    str(tmp_path / "o"),
                    "--no_progress",
                ]
            )
        assert exit_.value.code == 2
        assert f"error: {model_dir}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
