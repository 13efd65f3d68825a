"""Load OpenFlamingo-3B from the official files into the port: layout, key mapping, tokenizer, image preprocessing.

The directory given as `--vqa_model_path` (or `vqa_model.path`):

    <dir>/checkpoint.pt      openflamingo/OpenFlamingo-3B-vitl-mpt1b: perceiver, gated cross-attention,
                             embeddings (with the 3 added tokens)
    <dir>/lang_encoder/      anas-awadalla/mpt-1b-redpajama-200b: config.json, pytorch_model.bin
                             (or model.safetensors), tokenizer files
    <dir>/vision_encoder/    openai/clip-vit-large-patch14 (a CLIPModel or CLIPVisionModel directory)

Every key of `checkpoint.pt` and of the MPT weights must map onto the port, and every parameter of
the port must come from one of them (the CLIP tower loads through transformers): a missing or
unexpected key, or a wrong shape, is an InputError naming the file and the keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lever_lm.errors import InputError
from lever_lm.vqa.flamingo.model import OpenFlamingo
from lever_lm.vqa.flamingo.mpt import MPTConfig

CHECKPOINT = "checkpoint.pt"
LANG_DIR = "lang_encoder"
VISION_DIR = "vision_encoder"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"
# open_clip's normalisation for OpenAI CLIP (and transformers' CLIP image processor defaults)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# official checkpoint.pt key -> port key (full matches, tried in order)
CHECKPOINT_RULES = [
    (r"perceiver\.layers\.(\d+)\.0\.(.+)", r"perceiver.layers.\1.attn.\2"),
    (r"perceiver\.layers\.(\d+)\.1\.0\.(weight|bias)", r"perceiver.layers.\1.ff.norm.\2"),
    (r"perceiver\.layers\.(\d+)\.1\.1\.weight", r"perceiver.layers.\1.ff.up.weight"),
    (r"perceiver\.layers\.(\d+)\.1\.3\.weight", r"perceiver.layers.\1.ff.down.weight"),
    (r"perceiver\.(latents|norm\.weight|norm\.bias)", r"perceiver.\1"),
    (r"lang_encoder\.transformer\.wte\.weight", r"lang_model.transformer.wte.weight"),
    (
        r"lang_encoder\.transformer\.blocks\.(\d+)\.gated_cross_attn_layer\.ff\.0\.(weight|bias)",
        r"cross_attn.\1.ff.norm.\2",
    ),
    (r"lang_encoder\.transformer\.blocks\.(\d+)\.gated_cross_attn_layer\.ff\.1\.weight", r"cross_attn.\1.ff.up.weight"),
    (
        r"lang_encoder\.transformer\.blocks\.(\d+)\.gated_cross_attn_layer\.ff\.3\.weight",
        r"cross_attn.\1.ff.down.weight",
    ),
    (
        r"lang_encoder\.transformer\.blocks\.(\d+)\.gated_cross_attn_layer\.(attn\..+|attn_gate|ff_gate)",
        r"cross_attn.\1.\2",
    ),
]
# MPT-1B weight key -> port key; its embeddings are superseded by checkpoint.pt's (which hold the added tokens)
MPT_RULES = [(r"transformer\.((?:blocks\.\d+|ln_f)\..+)", r"lang_model.transformer.\1")]
MPT_SUPERSEDED = {"transformer.wte.weight"}
# the way back, port key -> official key (for writing models in the official layout, e.g. the demo's)
PORT_TO_OFFICIAL_RULES = [
    (r"perceiver\.layers\.(\d+)\.attn\.(.+)", r"perceiver.layers.\1.0.\2"),
    (r"perceiver\.layers\.(\d+)\.ff\.norm\.(weight|bias)", r"perceiver.layers.\1.1.0.\2"),
    (r"perceiver\.layers\.(\d+)\.ff\.up\.weight", r"perceiver.layers.\1.1.1.weight"),
    (r"perceiver\.layers\.(\d+)\.ff\.down\.weight", r"perceiver.layers.\1.1.3.weight"),
    (r"perceiver\.(latents|norm\.weight|norm\.bias)", r"perceiver.\1"),
    (r"lang_model\.transformer\.wte\.weight", r"lang_encoder.transformer.wte.weight"),
    (
        r"cross_attn\.(\d+)\.ff\.norm\.(weight|bias)",
        r"lang_encoder.transformer.blocks.\1.gated_cross_attn_layer.ff.0.\2",
    ),
    (r"cross_attn\.(\d+)\.ff\.up\.weight", r"lang_encoder.transformer.blocks.\1.gated_cross_attn_layer.ff.1.weight"),
    (r"cross_attn\.(\d+)\.ff\.down\.weight", r"lang_encoder.transformer.blocks.\1.gated_cross_attn_layer.ff.3.weight"),
    (
        r"cross_attn\.(\d+)\.(attn\..+|attn_gate|ff_gate)",
        r"lang_encoder.transformer.blocks.\1.gated_cross_attn_layer.\2",
    ),
    (r"lang_model\.transformer\.((?:blocks\.\d+|ln_f)\..+)", r"transformer.\1"),
]


@dataclass(frozen=True)
class FlamingoFiles:
    """The files of the layout above, checked to exist."""

    root: Path
    checkpoint: Path
    lang_dir: Path
    lang_weights: Path
    vision_dir: Path


@dataclass(frozen=True)
class LoadedFlamingo:
    model: OpenFlamingo
    tokenizer: object
    image_size: int
    media_token_id: int
    eoc_token_id: int
    pad_token_id: int


def locate_files(root: Path) -> FlamingoFiles:
    """The layout's files, or an InputError naming what is missing."""
    if not root.is_dir():
        raise InputError(root, "OpenFlamingo model directory not found (docs/backends.md: 'OpenFlamingo-3B')")
    checkpoint, lang_dir, vision_dir = root / CHECKPOINT, root / LANG_DIR, root / VISION_DIR
    if not checkpoint.is_file():
        raise InputError(checkpoint, "missing: the OpenFlamingo checkpoint (openflamingo/OpenFlamingo-3B-vitl-mpt1b)")
    for directory, what in ((lang_dir, "MPT-1B (anas-awadalla/mpt-1b-redpajama-200b)"), (vision_dir, "CLIP ViT-L/14")):
        if not (directory / "config.json").is_file():
            raise InputError(directory, f"missing: the {what} directory with its config.json")
    if not (lang_dir / "tokenizer.json").is_file():
        raise InputError(lang_dir, "missing: MPT-1B's tokenizer.json (the GPT-NeoX-20B tokenizer)")
    lang_weights = next((lang_dir / name for name in WEIGHT_FILES if (lang_dir / name).is_file()), None)
    if lang_weights is None:
        raise InputError(lang_dir, f"missing: MPT-1B weights ({' or '.join(WEIGHT_FILES)})")
    return FlamingoFiles(root, checkpoint, lang_dir, lang_weights, vision_dir)


def load_openflamingo(root: Path, device: torch.device, dtype: torch.dtype) -> LoadedFlamingo:
    """The port with the official weights, on `device` in `dtype`, in eval mode."""
    files = locate_files(root)
    mpt_config = MPTConfig.from_json(files.lang_dir / "config.json")
    tokenizer = load_tokenizer(files.lang_dir)
    checkpoint = read_state_dict(files.checkpoint)
    mpt_weights = read_state_dict(files.lang_weights)
    vision = _load_vision(files.vision_dir)
    wte = checkpoint.get("lang_encoder.transformer.wte.weight")
    vocab_rows = wte.shape[0] if wte is not None else len(tokenizer)
    if vocab_rows != len(tokenizer):
        raise InputError(
            files.checkpoint,
            f"its embeddings have {vocab_rows} rows, but the tokenizer of {files.lang_dir} with OpenFlamingo's "
            f"added tokens has {len(tokenizer)}: checkpoint and tokenizer do not belong together",
        )
    media_token_id = tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)
    with torch.device("meta"):  # no memory until the weights are assigned
        model = OpenFlamingo(vision, mpt_config, vocab_rows, media_token_id)
    model.load_state_dict(port_state(model, checkpoint, mpt_weights, files), strict=False, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedFlamingo(
        model=model,
        tokenizer=tokenizer,
        image_size=vision.config.image_size,
        media_token_id=media_token_id,
        eoc_token_id=tokenizer.convert_tokens_to_ids(EOC_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
    )


def load_tokenizer(lang_dir: Path):
    """MPT-1B's tokenizer with OpenFlamingo's additions, in its order: <|endofchunk|>, <image>, then <PAD>.

    Read straight from `tokenizer.json` and the special-token files: a tokenizer class would add its
    own defaults (transformers 5's GPT-NeoX tokenizer sets a pad token), and OpenFlamingo adds
    `<PAD>` only when the files name no pad token, so the ids must come out as in the original.
    """
    from transformers import PreTrainedTokenizerFast

    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(lang_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(lang_dir, f"cannot load the tokenizer: {type(error).__name__}: {error}") from None
    tokenizer.add_special_tokens({"additional_special_tokens": [EOC_TOKEN, MEDIA_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "left"  # generation continues every row at the same last column
    return tokenizer


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch file; a training checkpoint's `model_state_dict` is unwrapped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- any unreadable file is the user's input problem
        raise InputError(path, f"unreadable weights: {type(error).__name__}: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "expected a state dict (parameter name -> tensor)")
    return state


def port_state(model: OpenFlamingo, checkpoint: dict, mpt_weights: dict, files: FlamingoFiles) -> dict:
    """The port's state dict (CLIP aside) from the two official files, every key accounted for."""
    state = {
        **map_keys(checkpoint, CHECKPOINT_RULES, files.checkpoint),
        **map_keys(mpt_weights, MPT_RULES, files.lang_weights, MPT_SUPERSEDED),
    }
    check_state(model, state, files)
    return state


def official_state_dicts(model: OpenFlamingo) -> tuple[dict, dict]:
    """(checkpoint.pt, MPT weights) in the official key names, from the port: what `port_state` reads back.

    The MPT file's own embeddings (superseded at load) are those of the checkpoint.
    """
    rules = [(re.compile(pattern), target) for pattern, target in PORT_TO_OFFICIAL_RULES]
    checkpoint, mpt_weights = {}, {}
    for key, value in model.state_dict().items():
        if key.startswith("vision_encoder."):
            continue
        name = next(pattern.sub(target, key) for pattern, target in rules if pattern.fullmatch(key))
        (mpt_weights if name.startswith("transformer.") else checkpoint)[name] = value
    mpt_weights["transformer.wte.weight"] = checkpoint["lang_encoder.transformer.wte.weight"]
    return checkpoint, mpt_weights


def map_keys(state: dict, rules: list[tuple[str, str]], path: Path, superseded: set[str] = frozenset()) -> dict:
    """Source keys renamed by `rules`; a key no rule matches is an InputError naming it."""
    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    mapped, unknown = {}, []
    for key, value in state.items():
        if key in superseded:
            continue
        for pattern, target in compiled:
            if pattern.fullmatch(key):
                mapped[pattern.sub(target, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise InputError(path, f"unexpected keys (not part of OpenFlamingo-3B): {_some(unknown)}")
    return mapped


def check_state(model: OpenFlamingo, state: dict, files: FlamingoFiles) -> None:
    """Every port parameter (CLIP aside) present with its shape, or an InputError naming the keys."""
    expected = {key: value.shape for key, value in model.state_dict().items() if not key.startswith("vision_encoder.")}
    missing = sorted(set(expected) - set(state))
    if missing:
        checkpoint_side = [key for key in missing if not key.startswith("lang_model.")]
        where = files.checkpoint if checkpoint_side else files.lang_weights
        raise InputError(where, f"missing keys (port names): {_some(missing)}")
    wrong = [
        f"{key} {tuple(state[key].shape)} != {tuple(shape)}"
        for key, shape in expected.items()
        if state[key].shape != shape
    ]
    if wrong:
        raise InputError(
            files.root, f"shapes do not match the configuration in {files.lang_dir / 'config.json'}: {_some(wrong)}"
        )


def _load_vision(vision_dir: Path):
    from transformers import CLIPVisionModel

    try:
        return CLIPVisionModel.from_pretrained(vision_dir, local_files_only=True, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise InputError(vision_dir, f"cannot load as a CLIP vision model: {type(error).__name__}: {error}") from None


def clip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """open_clip's evaluation transform, exactly: shortest side to `size` (bicubic), centre crop,
    scale to [0, 1], normalise -> [3, size, size] float32."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    image = image.resize(new_size, Image.BICUBIC)
    left = round((image.width - size) / 2.0)  # Python's round, as torchvision's centre crop
    top = round((image.height - size) / 2.0)
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (pixels - mean) / std


def _some(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
