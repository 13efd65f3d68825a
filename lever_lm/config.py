"""The `--config` YAML: one file for the data set paths and the VQA model settings.

Top-level sections (each optional):

    dataset:                      # the training split (candidate pool and queries), docs/formats.md §2
      train_ques_path: ...        # official VQA questions JSON
      train_ann_path: ...         # official VQA annotations JSON
      train_image_root: ...       # directory of COCO_<split>2014_<image_id:012d>.jpg
      val_ques_path: ...          # questions/annotations used to score queries (see docs/formats.md §2 note)
      val_ann_path: ...
    vqa_model:                    # VQA model settings (path, system_prompt, templates, generation, batch_size)
      ...

Relative paths are taken relative to the working directory (where `dvc repro` runs), as on the
command line. Each section is read by the module that owns it; this one only parses the file.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from lever_lm.errors import InputError


def load_config(path: str | Path) -> dict:
    """The parsed YAML mapping; an empty file is an empty config."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise InputError(path, f"not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(path, f"expected a YAML mapping of sections, found {type(data).__name__}")
    return data


def config_section(config: dict, name: str, path: str | Path | None = None) -> dict:
    """One top-level section as a dict (empty when absent); InputError when it is not a mapping."""
    section = config.get(name)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise InputError(path, f"config section '{name}' must be a mapping, found {type(section).__name__}")
    return section
