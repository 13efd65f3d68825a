"""Data set paths: flags > config > preset (+ environment / .env), and errors that say what to set."""

from __future__ import annotations

from pathlib import Path

import pytest

from lever_lm.config import load_config
from lever_lm.data.dataset_paths import DatasetPaths, read_dotenv, resolve_dataset_paths
from lever_lm.errors import InputError

NO_FLAGS = {"train_ques_path": None, "train_ann_path": None, "train_image_root": None}


def _touch_okvqa(root: Path, prefix: str = "") -> DatasetPaths:
    root.mkdir(parents=True, exist_ok=True)
    q = root / f"{prefix}OpenEnded_mscoco_train2014_questions.json"
    a = root / f"{prefix}mscoco_train2014_annotations.json"
    images = root / "mscoco2014" / "train2014"
    images.mkdir(parents=True, exist_ok=True)
    q.write_text("{}")
    a.write_text("{}")
    return DatasetPaths(q, a, images)


def test_presets_come_from_environment_variables(tmp_path):
    ok = _touch_okvqa(tmp_path / "ok")
    v2 = _touch_okvqa(tmp_path / "v2", prefix="v2_")
    env = {"OKVQA_PATH": str(tmp_path / "ok"), "VQAV2_PATH": str(tmp_path / "v2"), "COCO_PATH": str(tmp_path / "ok")}
    assert resolve_dataset_paths("okvqa_local", NO_FLAGS, {}, env=env, dotenv_dir=tmp_path) == ok
    got = resolve_dataset_paths("vqav2_local", NO_FLAGS, {}, env=env, dotenv_dir=tmp_path)
    assert (got.train_ques_path, got.train_ann_path) == (v2.train_ques_path, v2.train_ann_path)
    assert got.train_image_root == ok.train_image_root  # images from $COCO_PATH


def test_flags_beat_config_beat_preset_field_by_field(tmp_path):
    preset = _touch_okvqa(tmp_path / "preset")
    config_q = tmp_path / "config_q.json"
    flag_a = tmp_path / "flag_a.json"
    config_q.write_text("{}")
    flag_a.write_text("{}")
    env = {"OKVQA_PATH": str(tmp_path / "preset"), "COCO_PATH": str(tmp_path / "preset")}
    config = {"dataset": {"train_ques_path": str(config_q), "train_ann_path": "/does/not/matter"}}
    flags = {**NO_FLAGS, "train_ann_path": flag_a}
    got = resolve_dataset_paths("okvqa_local", flags, config, env=env, dotenv_dir=tmp_path)
    assert got == DatasetPaths(config_q, flag_a, preset.train_image_root)


def test_everything_explicit_needs_no_environment(tmp_path):
    paths = _touch_okvqa(tmp_path / "x")
    flags = {"train_ques_path": paths.train_ques_path, "train_ann_path": paths.train_ann_path}
    config = {"dataset": {"train_image_root": str(paths.train_image_root)}}
    assert resolve_dataset_paths("not_a_preset", flags, config, env={}, dotenv_dir=tmp_path) == paths


def test_dotenv_sets_variables_and_the_real_environment_wins(tmp_path):
    a = _touch_okvqa(tmp_path / "a")
    b = _touch_okvqa(tmp_path / "b")
    (tmp_path / ".env").write_text(
        f'# data\nexport OKVQA_PATH="{tmp_path / "a"}"\nCOCO_PATH={tmp_path / "a"}  # images\n\nNOT A LINE\n'
    )
    assert read_dotenv(tmp_path / ".env") == {"OKVQA_PATH": str(tmp_path / "a"), "COCO_PATH": str(tmp_path / "a")}
    assert resolve_dataset_paths("okvqa_local", NO_FLAGS, {}, env={}, dotenv_dir=tmp_path) == a
    env = {"OKVQA_PATH": str(tmp_path / "b")}
    got = resolve_dataset_paths("okvqa_local", NO_FLAGS, {}, env=env, dotenv_dir=tmp_path)
    assert got.train_ques_path == b.train_ques_path and got.train_image_root == a.train_image_root


def test_missing_variable_says_which_to_set(tmp_path):
    with pytest.raises(InputError, match=r"needs \$OKVQA_PATH .* set OKVQA_PATH, or give --train_ques_path"):
        resolve_dataset_paths("okvqa_local", NO_FLAGS, {}, env={}, dotenv_dir=tmp_path)
    _touch_okvqa(tmp_path / "ok")
    with pytest.raises(InputError, match=r"needs \$COCO_PATH .* for train_image_root"):
        resolve_dataset_paths(
            "okvqa_local", NO_FLAGS, {}, env={"OKVQA_PATH": str(tmp_path / "ok")}, dotenv_dir=tmp_path
        )


def test_missing_file_names_the_path_and_its_source(tmp_path):
    env = {"OKVQA_PATH": str(tmp_path / "nowhere"), "COCO_PATH": str(tmp_path)}
    with pytest.raises(InputError, match=r"file not found for train_ques_path \(set from \$OKVQA_PATH") as error:
        resolve_dataset_paths("okvqa_local", NO_FLAGS, {}, env=env, dotenv_dir=tmp_path)
    assert error.value.path == str(tmp_path / "nowhere" / "OpenEnded_mscoco_train2014_questions.json")
    flags = {**NO_FLAGS, "train_ques_path": tmp_path / "q.json"}
    with pytest.raises(InputError, match=r"set from --train_ques_path"):
        resolve_dataset_paths("okvqa_local", flags, {}, env=env, dotenv_dir=tmp_path)
    config = {"dataset": {"train_ques_path": str(tmp_path / "q.json")}}
    with pytest.raises(InputError, match=r"set from train_ques_path in the config's dataset section"):
        resolve_dataset_paths("okvqa_local", NO_FLAGS, config, env=env, dotenv_dir=tmp_path)


def test_unknown_preset_and_bad_config_section(tmp_path):
    with pytest.raises(InputError, match=r"--dataset 'coco' is not a preset \(known: okvqa_local, vqav2_local\)"):
        resolve_dataset_paths("coco", NO_FLAGS, {}, env={}, dotenv_dir=tmp_path)
    with pytest.raises(InputError, match="config section 'dataset' must be a mapping"):
        resolve_dataset_paths("okvqa_local", NO_FLAGS, {"dataset": ["x"]}, env={}, config_path="c.yaml")


def test_load_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset:\n  train_ques_path: q.json\nvqa_model:\n  batch_size: 4\n")
    assert load_config(path) == {"dataset": {"train_ques_path": "q.json"}, "vqa_model": {"batch_size": 4}}
    path.write_text("")
    assert load_config(path) == {}
    for text, message in (("a: [1,", "not valid YAML"), ("- 1\n- 2\n", "expected a YAML mapping")):
        path.write_text(text)
        with pytest.raises(InputError, match=message) as error:
            load_config(path)
        assert error.value.path == str(path)
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
