"""Where the training split lives: flags > `--config` > `--dataset` preset + environment (docs/formats.md §2).

Each of the three paths is resolved on its own, so a user can e.g. keep the preset's files but
point `--train_image_root` elsewhere. The presets are the lineage's: `okvqa_local` and
`vqav2_local`, built from `$OKVQA_PATH` / `$VQAV2_PATH` and `$COCO_PATH`; a `.env` file in the
working directory may set those (a variable set in the real environment wins). Every path is
checked here, and an error says which flag, config key or variable to set -- the one thing a
user needs to know when a preset does not match their disk.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lever_lm.config import config_section, load_config
from lever_lm.data.vqa import VQADataset
from lever_lm.errors import InputError

FIELDS = ("train_ques_path", "train_ann_path", "train_image_root")

# preset -> field -> (environment variable, path under it)
PRESETS: dict[str, dict[str, tuple[str, str]]] = {
    "okvqa_local": {
        "train_ques_path": ("OKVQA_PATH", "OpenEnded_mscoco_train2014_questions.json"),
        "train_ann_path": ("OKVQA_PATH", "mscoco_train2014_annotations.json"),
        "train_image_root": ("COCO_PATH", "mscoco2014/train2014"),
    },
    "vqav2_local": {
        "train_ques_path": ("VQAV2_PATH", "v2_OpenEnded_mscoco_train2014_questions.json"),
        "train_ann_path": ("VQAV2_PATH", "v2_mscoco_train2014_annotations.json"),
        "train_image_root": ("COCO_PATH", "mscoco2014/train2014"),
    },
}
DEFAULT_DATASET = "okvqa_local"


@dataclass(frozen=True)
class DatasetPaths:
    train_ques_path: Path
    train_ann_path: Path
    train_image_root: Path

    def load(self) -> VQADataset:
        """The training split these paths name, read and checked."""
        return VQADataset.load(self.train_ques_path, self.train_ann_path, self.train_image_root)


def resolve_dataset_paths(
    dataset: str,
    flags: Mapping[str, object],
    config: Mapping[str, object],
    env: Mapping[str, str] | None = None,
    dotenv_dir: Path = Path("."),
    config_path: str | Path | None = None,
) -> DatasetPaths:
    """The training split's three paths, each from the first source that sets it; all checked to exist."""
    section = config_section(dict(config), "dataset", config_path)
    environment: Mapping[str, str] | None = None  # read lazily: only a preset needs it
    resolved: dict[str, Path] = {}
    for field in FIELDS:
        if flags.get(field):
            value, source = Path(str(flags[field])), f"--{field}"
        elif section.get(field):
            value, source = Path(str(section[field])), f"{field} in the config's dataset section"
        else:
            if environment is None:
                environment = merged_environment(env, dotenv_dir)
            value, source = _from_preset(dataset, field, environment)
        _check_exists(field, value, source)
        resolved[field] = value
    return DatasetPaths(**resolved)


def merged_environment(env: Mapping[str, str] | None, dotenv_dir: Path) -> dict[str, str]:
    """`.env` in `dotenv_dir` overlaid by the real environment (`env`, default os.environ)."""
    merged = read_dotenv(Path(dotenv_dir) / ".env")
    merged.update(os.environ if env is None else env)
    return merged


def read_dotenv(path: Path) -> dict[str, str]:
    """`KEY=VALUE` lines (optional `export `, quotes, `#` comments) of a .env file; {} if absent."""
    if not path.is_file():
        return {}
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.removeprefix("export ").split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key.strip()] = value
    return values


def _from_preset(dataset: str, field: str, environment: Mapping[str, str]) -> tuple[Path, str]:
    preset = PRESETS.get(dataset)
    if preset is None:
        raise InputError(
            None,
            f"--{field} is not set and --dataset {dataset!r} is not a preset (known: {', '.join(PRESETS)}); "
            f"give --{field}, or set {field} in the --config dataset section",
        )
    variable, relative = preset[field]
    root = environment.get(variable)
    if not root:
        raise InputError(
            None,
            f"--dataset {dataset} needs ${variable} (environment or .env) for {field}; "
            f"set {variable}, or give --{field} / {field} in the --config dataset section",
        )
    return Path(root) / relative, f"${variable} (--dataset {dataset}); or give --{field}"


def _check_exists(field: str, path: Path, source: str) -> None:
    exists = path.is_dir() if field == "train_image_root" else path.is_file()
    if not exists:
        kind = "image directory" if field == "train_image_root" else "file"
        raise InputError(path, f"{kind} not found for {field} (set from {source})")


# -- command-line helpers shared by the stages that read the training split ------------------------


def add_dataset_arguments(parser: argparse.ArgumentParser, with_config: bool = True) -> None:
    """The data set flags of docs/formats.md §2: --dataset, --train_* paths (and --config)."""
    parser.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help=f"data set preset whose paths come from $OKVQA_PATH/$VQAV2_PATH and $COCO_PATH (or .env): "
        f"{', '.join(PRESETS)} (default: {DEFAULT_DATASET}); --train_* flags and --config win over it",
    )
    if with_config:
        parser.add_argument("--config", type=Path, help="YAML config; its 'dataset' section may set the train_* paths")
    parser.add_argument("--train_ques_path", type=Path, help="official VQA questions JSON of the training split")
    parser.add_argument("--train_ann_path", type=Path, help="official VQA annotations JSON of the training split")
    parser.add_argument("--train_image_root", type=Path, help="directory of the split's COCO_<split>_<id>.jpg images")


def dataset_paths_from_args(args: argparse.Namespace) -> DatasetPaths:
    """Resolve the flags added by `add_dataset_arguments` (reads --config when given)."""
    config_path = getattr(args, "config", None)
    config = load_config(config_path) if config_path else {}
    flags = {field: getattr(args, field) for field in FIELDS}
    return resolve_dataset_paths(args.dataset, flags, config, config_path=config_path)
