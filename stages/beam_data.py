"""DVC stage: InfoScore beam data (see lever_lm.infoscore.cli).

The command line in dvc.yaml gives the stage's own files and the `infoscore` section; the
settings it shares with the RL generator -- the training split, the VQA model and its config,
device, batch size and engine -- come from params.yaml's top level, mapped onto the flags by
`lever_lm.params.flags_from_params` (a null or empty value keeps the default).
"""

import sys

import yaml

from lever_lm.infoscore.cli import build_parser, main
from lever_lm.params import flags_from_params

SHARED = (
    "dataset", "train_ques_path", "train_ann_path", "train_image_root", "vqa_model", "vqa_model_path", "config",
    "device", "batch_size", "engine", "ray_address", "num_workers", "gpus_per_worker",
)  # fmt: skip

if __name__ == "__main__":
    with open("params.yaml", encoding="utf-8") as handle:
        params = yaml.safe_load(handle)
    main(flags_from_params({key: params[key] for key in SHARED if key in params}, build_parser()) + sys.argv[1:])
