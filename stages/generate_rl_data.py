"""DVC stage: RL data generation with the settings of params.yaml (see lever_lm.models.v3.generate_rl_data).

Every top-level key of params.yaml that is a flag of the generator becomes that flag; empty
values are left out. Extra command-line arguments are passed through (e.g. --limit 8).
"""

import sys

import yaml

from lever_lm.models.v3.generate_rl_data import main

FLAGS = (
    "sft_ckpt", "beam_data", "output_path", "query_emb", "cand_emb", "vqa_model", "vqa_model_path",
    "dataset", "train_ques_path", "train_ann_path", "train_image_root", "val_ques_path", "val_ann_path",
    "config", "num_beams", "temps", "num_samples_per_temp", "num_random", "num_retrieval", "seed",
    "eval_mode", "device", "batch_size",
)


def argv_from_params(params: dict) -> list[str]:
    argv = []
    for flag in FLAGS:
        value = params.get(flag)
        if value is None or value == "":
            continue
        values = value if isinstance(value, list) else [value]
        argv += [f"--{flag}", *map(str, values)]
    return argv


if __name__ == "__main__":
    with open("params.yaml", encoding="utf-8") as handle:
        main(argv_from_params(yaml.safe_load(handle)) + sys.argv[1:])
