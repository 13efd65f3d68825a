"""Build the OpenFlamingo reference files of the tests with the OFFICIAL implementation (not run by CI).

What it writes into --out:
- `model/`: a tiny random OpenFlamingo in the layout `--vqa_model_path` takes (`checkpoint.pt`,
  `lang_encoder/` = MPT weights, config and tokenizer, `vision_encoder/` = CLIP vision tower);
- `images/*.png`, `cases.json` (prompts, token ids, generated tokens) and `expected.safetensors`
  (pixels, vision tokens, resampled media, logits): what the official code computes for them;
- `openflamingo_3b_layout.json`: key names and shapes of the real OpenFlamingo-3B `checkpoint.pt`
  and MPT-1B weights, from the official model built with the real configuration on the meta device.

It runs in its own environment, never the project's (the official package pins torch 2.0.1):

    python3.11 -m venv /tmp/of-env
    /tmp/of-env/bin/pip install open-flamingo==2.0.1 torch==2.0.1 torchvision==0.15.2 \
        transformers==4.28.1 open-clip-torch==2.20.0 "numpy<2"
    /tmp/of-env/bin/python tests/reference/flamingo/make_reference.py --mpt_code DIR --out tests/reference/flamingo

DIR holds MPT-1B's modelling code, the remote code of `anas-awadalla/mpt-1b-redpajama-200b`
(MosaicML's `MosaicGPT`): `configuration_mosaic_gpt.py`, `mosaic_gpt.py`, `attention.py`,
`gpt_blocks.py`, `low_precision_layernorm.py`, `param_init_fns.py`. The model is built exactly as
`open_flamingo.create_model_and_transforms` builds OpenFlamingo-3B (that very function is called),
with a tiny CLIP config registered in open_clip and a tiny MPT config in place of the real ones.

Every weight is random, drawn at scales that make the logits decisive (clear gaps between the
best tokens, so that generated tokens do not hinge on rounding), and rounded to float16 so that the
stored float16 files hold exactly the weights the reference was computed with.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SEED = 9  # of seeds 0-11, one whose beam and greedy answers differ, with clear logit gaps
TINY_CLIP = {
    "embed_dim": 8,
    "quick_gelu": True,  # OpenAI CLIP (ViT-L/14 "openai") uses QuickGELU
    "vision_cfg": {"image_size": 28, "layers": 2, "width": 8, "head_width": 4, "patch_size": 14},
    "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 8, "heads": 2, "layers": 1},
}
TINY_MPT = {
    "d_model": 16,
    "n_heads": 2,
    "n_layers": 2,
    "mlp_ratio": 4,
    "max_seq_len": 256,
    "vocab_size": 288,  # larger than the tokenizer, as MPT-1B's 50432 rows are for 50277 tokens
    "attn_impl": "torch",
    "attn_qk_ln": True,
    "alibi": True,
    "alibi_bias_max": 8,
    "no_bias": True,
    "low_precision_layernorm": True,
}
# MPT-1B RedPajama-200B (model card: 24 layers, 16 heads, width 2048, ALiBi, QK LayerNorm, no biases).
REAL_MPT = {
    "d_model": 2048,
    "n_heads": 16,
    "n_layers": 24,
    "mlp_ratio": 4,
    "max_seq_len": 2048,
    "vocab_size": 50432,
    "attn_impl": "torch",
    "attn_qk_ln": True,
    "alibi": True,
    "alibi_bias_max": 8,
    "no_bias": True,
    "low_precision_layernorm": True,
}
REAL_TOKENIZER_LENGTH = 50277  # EleutherAI/gpt-neox-20b, MPT-1B's tokenizer
CORPUS = [
    "Question:What color is the square? Short answer:red",
    "Question:How many circles are there? Short answer:three",
    "Question:Is there a triangle on the left side? Short answer:yes",
    "Question:What shape is blue? Short answer:circle",
    "Question:Which side is the star on? Short answer:right",
    "the a an of is are there what how many color shape side left right yes no one two three four",
]
QUESTIONS = [
    ("What color is the square?", "red"),
    ("How many circles?", "2"),
    ("Is there a triangle on the left side of the picture?", "yes"),
    ("What shape is blue?", "circle"),
    ("Which side?", "right"),
]
IMAGE_SIZES = [(40, 30), (33, 45), (28, 28), (50, 37), (31, 29)]
GENERATION = {"max_new_tokens": 5, "num_beams": 3, "length_penalty": 0.0, "do_sample": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mpt_code", type=Path, required=True, help="directory of MPT-1B's remote modelling code")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))  # imported by open_flamingo.train, unused here
    out = args.out
    for stale in ("model", "images"):
        shutil.rmtree(out / stale, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_tiny_reference(args.mpt_code, work, out)
        write_real_layout(args.mpt_code, work, out / "openflamingo_3b_layout.json")


# -- the tiny model and its reference outputs ---------------------------------------------------------


def build_tiny_reference(mpt_code: Path, work: Path, out: Path) -> None:
    import open_clip
    from open_flamingo import create_model_and_transforms

    torch.manual_seed(SEED)
    (work / "clip").mkdir()
    (work / "clip" / "ViT-tiny-test.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(work / "clip")
    # the factory recognises MPT-1B by this directory name (its get_input_embeddings patch)
    mpt_dir = work / "mpt-1b-redpajama-200b-tiny"
    write_mpt_dir(mpt_code, mpt_dir, TINY_MPT)
    write_tokenizer(mpt_dir)
    save_random_mpt(mpt_dir)

    model, image_processor, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path="ViT-tiny-test",
        clip_vision_encoder_pretrained=None,
        lang_encoder_path=str(mpt_dir),
        tokenizer_path=str(mpt_dir),
        cross_attn_every_n_layers=1,
        use_local_files=True,
    )
    model.eval()
    randomise_flamingo(model)
    model_dir = out / "model"
    save_user_layout(model, mpt_dir, tokenizer, model_dir)

    images = write_images(out / "images")
    cases = [
        {"name": "batch_of_three", "prompts": [[0, 1], [2, 3], [4, 0]]},
        {"name": "two_icds", "prompts": [[1, 3, 2]]},
    ]
    tensors: dict[str, torch.Tensor] = {}
    pixels = torch.stack([image_processor(Image.open(path)) for path in images])
    with torch.no_grad():
        tokens = model.vision_encoder(pixels)[1]
        media = model.perceiver(tokens[:, None, None])[:, 0]
    tensors["pixels"], tensors["vision_tokens"], tensors["media"] = pixels, tokens, media
    min_gap = float("inf")
    for case in cases:
        texts = [prompt_text(indices) for indices in case["prompts"]]
        tokenizer.padding_side = "left"
        encoded = tokenizer(texts, padding="longest", return_tensors="pt")
        vision_x = torch.stack([pixels[indices] for indices in case["prompts"]])[:, :, None]  # b T 1 c h w
        with torch.no_grad():
            logits = model(
                vision_x=vision_x, lang_x=encoded["input_ids"], attention_mask=encoded["attention_mask"]
            ).logits
        tensors[f"{case['name']}.logits"] = logits
        case["texts"] = texts
        case["input_ids"] = encoded["input_ids"].tolist()
        case["attention_mask"] = encoded["attention_mask"].tolist()
        case["images"] = [[images[i].name for i in indices] for indices in case["prompts"]]
        for name, settings in (("beam", GENERATION), ("greedy", {**GENERATION, "num_beams": 1})):
            with torch.no_grad():
                generated = model.generate(
                    vision_x=vision_x,
                    lang_x=encoded["input_ids"],
                    attention_mask=encoded["attention_mask"],
                    pad_token_id=tokenizer.pad_token_id,
                    **settings,
                )
            new = generated[:, encoded["input_ids"].shape[1] :]
            if (new == model.media_token_id).any():
                raise SystemExit(f"{case['name']}/{name}: generated an <image> token; choose another seed")
            case[f"generated_{name}"] = new.tolist()
            case[f"decoded_{name}"] = tokenizer.batch_decode(new, skip_special_tokens=True)
        min_gap = min(min_gap, greedy_path_gap(model, vision_x, encoded, case["generated_greedy"], tokenizer))
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in tensors.items()}, out / "expected.safetensors")
    meta = {
        "made_by": "tests/reference/flamingo/make_reference.py (official open_flamingo 2.0.1)",
        "versions": versions(),
        "generation": GENERATION,
        "tokens": {
            "eoc": model.eoc_token_id,
            "media": model.media_token_id,
            "pad": tokenizer.pad_token_id,
            "tokenizer_length": len(tokenizer),
        },
        "min_top2_logit_gap_on_greedy_paths": min_gap,
        "images": [path.name for path in images],
        "cases": cases,
    }
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"reference written to {out}; smallest top-2 logit gap on the greedy paths: {min_gap:.3f}")


def write_mpt_dir(mpt_code: Path, mpt_dir: Path, settings: dict) -> None:
    """MPT's remote code plus a config.json pointing at it, as on the model hub."""
    mpt_dir.mkdir(parents=True)
    for name in (
        "configuration_mosaic_gpt.py",
        "mosaic_gpt.py",
        "attention.py",
        "gpt_blocks.py",
        "low_precision_layernorm.py",
        "param_init_fns.py",
    ):
        shutil.copy(mpt_code / name, mpt_dir / name)
    config = {
        **settings,
        "model_type": "mosaic_gpt",
        "architectures": ["MosaicGPT"],
        "auto_map": {
            "AutoConfig": "configuration_mosaic_gpt.MosaicGPTConfig",
            "AutoModelForCausalLM": "mosaic_gpt.MosaicGPT",
        },
        "init_device": "cpu",
        "use_cache": False,
    }
    (mpt_dir / "config.json").write_text(json.dumps(config, indent=2))


def write_tokenizer(mpt_dir: Path) -> None:
    """A small byte-level BPE in GPT-NeoX form (MPT-1B uses the GPT-NeoX-20B tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import GPTNeoXTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=272,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    fast = GPTNeoXTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        add_prefix_space=False,
    )
    fast.save_pretrained(mpt_dir)


def save_random_mpt(mpt_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(mpt_dir, trust_remote_code=True, local_files_only=True)
    mpt = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    randomise(mpt, embedding_std=1.0)
    mpt.save_pretrained(mpt_dir)


def randomise(module: torch.nn.Module, embedding_std: float) -> None:
    """Decisive random weights, exactly representable in float16."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "gate" in leaf:
                p.uniform_(-1.0, 1.0)
            elif name == "transformer.ln_f.weight":  # mixed signs: no echo of the input token through tied embeddings
                p.normal_(0.0, 1.0)
            elif p.ndim == 1 and ("ln" in name or "norm" in name):
                p.normal_(1.0 if leaf == "weight" else 0.0, 0.2)
            elif "wte" in name or "embedding" in name or leaf == "latents":
                p.normal_(0.0, embedding_std)
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.normal_(0.0, 2.0 / fan_in**0.5)
            else:
                p.normal_(0.0, 0.2)
            p.copy_(p.half().float())


def randomise_flamingo(model) -> None:
    randomise(model.vision_encoder, embedding_std=0.5)
    randomise(model.perceiver, embedding_std=1.0)
    randomise(model.lang_encoder.gated_cross_attn_layers, embedding_std=1.0)
    with torch.no_grad():  # the checkpoint's embeddings differ from MPT's own, so the test sees which one wins
        wte = model.lang_encoder.transformer.wte.weight
        wte.add_(torch.randn_like(wte) * 0.3)
        wte.copy_(wte.half().float())


def save_user_layout(model, mpt_dir: Path, tokenizer, model_dir: Path) -> None:
    """checkpoint.pt as the official training saves it; MPT and CLIP directories beside it."""
    from open_flamingo.train.train_utils import filter_state_dict_to_trainable

    model_dir.mkdir(parents=True)
    state = filter_state_dict_to_trainable(model, model.state_dict())
    torch.save({key: value.half() for key, value in state.items()}, model_dir / "checkpoint.pt")

    lang_dir = model_dir / "lang_encoder"
    lang_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(mpt_dir / name, lang_dir / name)
    config = json.loads((mpt_dir / "config.json").read_text())
    config.pop("_name_or_path", None)  # a temporary directory
    (lang_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    mpt_weights = torch.load(mpt_dir / "pytorch_model.bin")
    torch.save({key: value.half() for key, value in mpt_weights.items()}, lang_dir / "pytorch_model.bin")

    save_hf_clip_vision(model.vision_encoder, model_dir / "vision_encoder")


def save_hf_clip_vision(visual, out_dir: Path) -> None:
    """open_clip's vision tower as a Hugging Face CLIPVisionModel (what openai/clip-vit-large-patch14 holds)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = TINY_CLIP["vision_cfg"]
    config = CLIPVisionConfig(
        hidden_size=cfg["width"],
        intermediate_size=cfg["width"] * 4,
        num_attention_heads=cfg["width"] // cfg["head_width"],
        num_hidden_layers=cfg["layers"],
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        projection_dim=TINY_CLIP["embed_dim"],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    hf = CLIPVisionModel(config).eval()
    src = visual.state_dict()
    dst = {
        "vision_model.embeddings.class_embedding": src["class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": src["conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": src["positional_embedding"],
        "vision_model.pre_layrnorm.weight": src["ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": src["ln_pre.bias"],
        "vision_model.post_layernorm.weight": src["ln_post.weight"],
        "vision_model.post_layernorm.bias": src["ln_post.bias"],
    }
    for i in range(cfg["layers"]):
        s, d = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for part, weight in zip(("q", "k", "v"), src[s + "attn.in_proj_weight"].chunk(3)):
            dst[d + f"self_attn.{part}_proj.weight"] = weight
        for part, bias in zip(("q", "k", "v"), src[s + "attn.in_proj_bias"].chunk(3)):
            dst[d + f"self_attn.{part}_proj.bias"] = bias
        pairs = {
            "attn.out_proj": "self_attn.out_proj",
            "ln_1": "layer_norm1",
            "ln_2": "layer_norm2",
            "mlp.c_fc": "mlp.fc1",
            "mlp.c_proj": "mlp.fc2",
        }
        for ours, theirs in pairs.items():
            dst[d + theirs + ".weight"] = src[s + ours + ".weight"]
            dst[d + theirs + ".bias"] = src[s + ours + ".bias"]
    missing, unexpected = hf.load_state_dict(dst, strict=False)
    assert not unexpected and all("position_ids" in key for key in missing), (missing, unexpected)
    pixels = torch.randn(2, 3, cfg["image_size"], cfg["image_size"])
    with torch.no_grad():
        theirs = visual(pixels)[1]
        ours = hf(pixel_values=pixels).last_hidden_state[:, 1:]
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()
    hf.half().save_pretrained(out_dir)


def write_images(out_dir: Path) -> list[Path]:
    rng = np.random.default_rng(SEED)
    out_dir.mkdir(parents=True)
    paths = []
    for i, (width, height) in enumerate(IMAGE_SIZES):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        path = out_dir / f"image_{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def prompt_text(indices: list[int]) -> str:
    """The project's Flamingo prompt: ICDs with answers, then the query."""
    parts = [f"<image>Question:{QUESTIONS[i][0]} Short answer:{QUESTIONS[i][1]}<|endofchunk|>" for i in indices[:-1]]
    return "".join(parts) + f"<image>Question:{QUESTIONS[indices[-1]][0]} Short answer:"


def greedy_path_gap(model, vision_x, encoded, generated: list[list[int]], tokenizer) -> float:
    """The smallest gap between the two best logits along the greedy continuations."""
    gaps = []
    for row in range(len(generated)):
        ids = encoded["input_ids"][row : row + 1]
        mask = encoded["attention_mask"][row : row + 1]
        for token in generated[row]:
            with torch.no_grad():
                logits = model(vision_x=vision_x[row : row + 1], lang_x=ids, attention_mask=mask).logits[0, -1]
            top2 = logits.topk(2).values
            gaps.append(float(top2[0] - top2[1]))
            if token in (model.eoc_token_id, tokenizer.pad_token_id):
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    return min(gaps)


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("open-flamingo", "open-clip-torch", "torch", "transformers")}


# -- the real OpenFlamingo-3B layout -------------------------------------------------------------


def write_real_layout(mpt_code: Path, work: Path, out_file: Path) -> None:
    """Key names and shapes of checkpoint.pt and of MPT-1B's weights, from the official model on the meta device."""
    import open_clip
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance
    from open_flamingo.train.train_utils import filter_state_dict_to_trainable
    from transformers import AutoConfig, AutoModelForCausalLM

    mpt_dir = work / "mpt-1b-redpajama-200b"
    write_mpt_dir(mpt_code, mpt_dir, {**REAL_MPT, "init_device": "meta"})
    config = AutoConfig.from_pretrained(mpt_dir, trust_remote_code=True, local_files_only=True)
    config.init_device = "meta"
    with torch.device("meta"):
        clip = open_clip.model.CLIP(**open_clip.get_model_config("ViT-L-14"), quick_gelu=True)
        lang_encoder = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    mpt_keys = {key: list(value.shape) for key, value in lang_encoder.state_dict().items()}

    # from here on, open_flamingo.create_model_and_transforms step by step (it cannot run on meta tensors)
    clip.visual.output_tokens = True
    eoc_id, media_id, pad_id = REAL_TOKENIZER_LENGTH, REAL_TOKENIZER_LENGTH + 1, REAL_TOKENIZER_LENGTH + 2

    class EmbeddingFnMixin:
        def get_input_embeddings(self):
            return self.transformer.wte

        def set_input_embeddings(self, new_embeddings):
            self.transformer.wte = new_embeddings

    extend_instance(lang_encoder, EmbeddingFnMixin)
    extend_instance(lang_encoder, FlamingoLMMixin)
    lang_encoder.set_decoder_layers_attr_name("transformer.blocks")
    with torch.device("meta"):
        lang_encoder.resize_token_embeddings(pad_id + 1)
        model = Flamingo(
            clip,
            lang_encoder,
            eoc_id,
            media_id,
            vis_dim=open_clip.get_model_config("ViT-L-14")["vision_cfg"]["width"],
            cross_attn_every_n_layers=1,
        )
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    state = filter_state_dict_to_trainable(model, model.state_dict())
    layout = {
        "made_by": "tests/reference/flamingo/make_reference.py (official open_flamingo 2.0.1, meta device)",
        "versions": versions(),
        "mpt_config": REAL_MPT,
        "tokenizer_length": REAL_TOKENIZER_LENGTH,
        "added_tokens": {"<|endofchunk|>": eoc_id, "<image>": media_id, "<PAD>": pad_id},
        "vis_dim": open_clip.get_model_config("ViT-L-14")["vision_cfg"]["width"],
        "checkpoint": {key: list(value.shape) for key, value in state.items()},
        "mpt_weights": mpt_keys,
    }
    out_file.write_text(json.dumps(layout, indent=1) + "\n")
    print(f"layout written to {out_file}: {len(state)} checkpoint keys, {len(mpt_keys)} MPT keys")


if __name__ == "__main__":
    main()
