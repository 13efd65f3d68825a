"""The OpenFlamingo-3B port against the official implementation, the real 3B layout, and the backend.

`tests/reference/flamingo/` was made with the official `open_flamingo` 2.0.1 (torch 2.0.1,
transformers 4.28.1) by `make_reference.py` there: a tiny random OpenFlamingo in the user layout,
images, prompts, and what the official code computed for them. The port must give the same pixels,
vision tokens, resampled media and logits (within LOGITS_ATOL; measured: 8.4e-5 on logits of
magnitude up to 18) and exactly the same generated tokens, beam and greedy.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lever_lm.errors import InputError
from lever_lm.vqa.backends import describe_settings, load_backend
from lever_lm.vqa.flamingo.generation import FlamingoForGeneration
from lever_lm.vqa.flamingo.loading import (
    FlamingoFiles,
    clip_pixels,
    load_openflamingo,
    official_state_dicts,
    port_state,
)
from lever_lm.vqa.flamingo.model import OpenFlamingo
from lever_lm.vqa.flamingo.mpt import MPTConfig
from lever_lm.vqa.prompts import FewShotPrompt, Shot, flamingo_text

REFERENCE = Path(__file__).parent / "reference" / "flamingo"
CASES = json.loads((REFERENCE / "cases.json").read_text())
LOGITS_ATOL = 5e-4
FEATURES_ATOL = 2e-4
# the questions and answers make_reference.py put into its prompts, by image index
QUESTIONS = [
    ("What color is the square?", "red"),
    ("How many circles?", "2"),
    ("Is there a triangle on the left side of the picture?", "yes"),
    ("What shape is blue?", "circle"),
    ("Which side?", "right"),
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def flamingo():
    return load_openflamingo(REFERENCE / "model", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE / "expected.safetensors")


def _case(name: str) -> dict:
    return next(case for case in CASES["cases"] if case["name"] == name)


def _prompt(indices: list[int]) -> FewShotPrompt:
    image = [REFERENCE / "images" / name for name in CASES["images"]]
    shots = tuple(Shot(image[i], *QUESTIONS[i]) for i in indices[:-1])
    return FewShotPrompt(shots=shots, query=Shot(image[indices[-1]], QUESTIONS[indices[-1]][0]))


# -- 1. equivalence with the official implementation ---------------------------------------------


def test_tokens_and_pixels_are_the_officials(flamingo, expected):
    tokens = CASES["tokens"]
    assert (flamingo.eoc_token_id, flamingo.media_token_id, flamingo.pad_token_id) == (
        tokens["eoc"],
        tokens["media"],
        tokens["pad"],
    )
    assert len(flamingo.tokenizer) == tokens["tokenizer_length"]
    for case in CASES["cases"]:
        encoded = flamingo.tokenizer(case["texts"], padding=True)
        assert encoded["input_ids"] == case["input_ids"] and encoded["attention_mask"] == case["attention_mask"]
    images = [Image.open(REFERENCE / "images" / name).convert("RGB") for name in CASES["images"]]
    pixels = torch.stack([clip_pixels(image, flamingo.image_size) for image in images])
    assert torch.equal(pixels, expected["pixels"])  # same resize, crop and normalisation, bit for bit


def test_vision_tokens_media_and_logits_match_the_official_model(flamingo, expected):
    model = flamingo.model
    with torch.no_grad():
        tokens = model.vision_encoder(pixel_values=expected["pixels"]).last_hidden_state[:, 1:]
        torch.testing.assert_close(tokens, expected["vision_tokens"], atol=FEATURES_ATOL, rtol=0)
        media = model.encode_images(expected["pixels"])
        torch.testing.assert_close(media, expected["media"], atol=FEATURES_ATOL, rtol=0)
        for case in CASES["cases"]:
            ids, mask = torch.tensor(case["input_ids"]), torch.tensor(case["attention_mask"])
            rows = torch.tensor(case["prompts"])
            logits = model(ids, mask, media[rows], torch.ones(rows.shape, dtype=torch.bool))
            reference = expected[f"{case['name']}.logits"]
            real = mask.bool()  # padding positions carry no meaning in either implementation
            torch.testing.assert_close(logits[real], reference[real], atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("decoding, num_beams", [("beam", 3), ("greedy", 1)])
def test_generated_tokens_are_the_officials(flamingo, expected, decoding, num_beams):
    generator = FlamingoForGeneration(flamingo.model, flamingo.eoc_token_id, flamingo.pad_token_id)
    with torch.no_grad():
        media = flamingo.model.encode_images(expected["pixels"])
    for case in CASES["cases"]:
        ids, mask = torch.tensor(case["input_ids"]), torch.tensor(case["attention_mask"])
        rows = torch.tensor(case["prompts"])
        settings = {**CASES["generation"], "num_beams": num_beams}
        output = generator.generate(
            input_ids=ids,
            attention_mask=mask,
            media=media[rows],
            media_mask=torch.ones(rows.shape, dtype=torch.bool),
            **settings,
        )
        assert output[:, ids.shape[1] :].tolist() == case[f"generated_{decoding}"], case["name"]


def test_backend_answers_like_the_official_model_batched_or_alone():
    """The whole backend path: prompt text, image cache, left padding, beam search, decoding."""
    batched = load_backend("flamingo_3B", model_path=str(REFERENCE / "model"), device="cpu", batch_size=3)
    for case in CASES["cases"]:
        prompts = [_prompt(indices) for indices in case["prompts"]]
        assert [g.raw for g in batched.generate(prompts)] == case["decoded_beam"]
    alone = load_backend("flamingo_3B", model_path=str(REFERENCE / "model"), device="cpu", batch_size=1)
    prompts = [_prompt(indices) for indices in _case("batch_of_three")["prompts"]]
    assert [g.raw for g in alone.generate(prompts)] == _case("batch_of_three")["decoded_beam"]
    assert len(batched.image_cache) == len(CASES["images"])  # every image encoded once


def test_mixed_image_counts_and_an_unreadable_image_in_one_batch(tmp_path):
    backend = load_backend("flamingo_3B", model_path=str(REFERENCE / "model"), device="cpu", batch_size=8)
    broken = FewShotPrompt(shots=(), query=Shot(tmp_path / "missing.png", "What?"))
    two_icds, one_icd = _prompt(_case("two_icds")["prompts"][0]), _prompt(_case("batch_of_three")["prompts"][0])
    results = backend.generate([two_icds, broken, one_icd])
    assert results[1].error is not None and "missing.png" in results[1].error
    assert results[0].raw == _case("two_icds")["decoded_beam"][0]  # padded media never leak into a row
    assert results[2].raw == _case("batch_of_three")["decoded_beam"][0]


def test_reply_likelihoods_equal_a_plain_forward_pass_and_leave_the_answers_alone():
    backend = load_backend("flamingo_3B", model_path=str(REFERENCE / "model"), device="cpu", batch_size=3)
    prompts = [_prompt(indices) for indices in _case("batch_of_three")["prompts"]]
    replies = [("red", "2", "a blue, circle"), ("yes",), ("right", "left side")]
    results = backend.generate(prompts, replies)
    assert [g.raw for g in results] == _case("batch_of_three")["decoded_beam"]
    total = 0.0
    for prompt, asked, generation in zip(prompts, replies, results):
        prepared = backend._prepare(prompt, asked)
        alone = backend._encode([prepared])  # one prompt: no padding at all
        for reply, tokens, got in zip(asked, prepared.reply_tokens, generation.reply_logprobs):
            ids = torch.cat([alone["input_ids"], torch.tensor([tokens])], dim=1)
            mask = torch.ones_like(ids)
            with torch.inference_mode():
                logits = backend.model(ids, mask, alone["media"], alone["media_mask"])
            logprobs = torch.log_softmax(logits.float(), dim=-1)[0, -len(tokens) - 1 : -1]
            expected = float(logprobs.gather(1, torch.tensor(tokens)[:, None]).sum())
            assert got == pytest.approx(expected, abs=1e-4), reply
            assert tokens[-1] == backend.eoc_token_id
            total += math.exp(got)
    assert 0.0 < total < len(prompts)


def test_control_token_text_in_questions_and_answers_stays_text():
    """`<image>` in a question and `<|endofchunk|>` in an ICD answer or a reply are characters, never
    markers: the prompt has one <image> per image and one end of chunk per ICD, and it is answered."""
    backend = load_backend("flamingo_3B", model_path=str(REFERENCE / "model"), device="cpu", batch_size=2)
    plain = _prompt([0, 1, 2])
    icd, query = plain.shots[0], plain.query
    tricky = FewShotPrompt(
        shots=(Shot(icd.image, "What <image> is <|endofchunk|>red?", "red<|endofchunk|><image>"), plain.shots[1]),
        query=Shot(query.image, "Is <image><image> a triangle?"),
    )
    for prompt in (plain, tricky):
        prepared = backend._prepare(prompt, ("yes<|endofchunk|>",))
        ids = backend._encode([prepared])["input_ids"][0].tolist()
        assert ids.count(backend.media_token_id) == 3 and ids.count(backend.eoc_token_id) == 2
        assert prepared.reply_tokens[0].count(backend.eoc_token_id) == 1  # only the one that ends the reply
    escaped = backend._encode([backend._prepare(tricky)])["input_ids"][0].tolist()
    assert backend.tokenizer.decode(escaped) == flamingo_text(tricky, backend.settings.prompt)
    results = backend.generate([plain, tricky])
    assert all(g.error is None for g in results)
    assert results[0].raw == backend.generate([plain])[0].raw  # ordinary prompts: the same ids as before


# -- 2. the real OpenFlamingo-3B layout ------------------------------------------------------------


def test_loader_consumes_exactly_the_real_3b_keys_and_shapes(tmp_path):
    """Key names and shapes dumped from the official model built with the real configuration."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    layout = json.loads((REFERENCE / "openflamingo_3b_layout.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**layout["mpt_config"], "model_type": "mosaic_gpt"}))
    config = MPTConfig.from_json(tmp_path / "config.json")
    checkpoint = {key: torch.empty(shape, device="meta") for key, shape in layout["checkpoint"].items()}
    mpt_weights = {key: torch.empty(shape, device="meta") for key, shape in layout["mpt_weights"].items()}
    with torch.device("meta"):
        vision = CLIPVisionModel(
            CLIPVisionConfig(hidden_size=layout["vis_dim"], num_attention_heads=16, num_hidden_layers=1)
        )
        rows = layout["checkpoint"]["lang_encoder.transformer.wte.weight"][0]
        model = OpenFlamingo(vision, config, rows, media_token_id=layout["added_tokens"]["<image>"])
    files = FlamingoFiles(tmp_path, tmp_path / "checkpoint.pt", tmp_path, tmp_path / "pytorch_model.bin", tmp_path)
    state = port_state(model, checkpoint, mpt_weights, files)  # raises on any missing/unexpected key or shape
    ours = {key: list(value.shape) for key, value in model.state_dict().items() if not key.startswith("vision_")}
    assert {key: list(value.shape) for key, value in state.items()} == ours
    assert rows == layout["tokenizer_length"] + 3  # <|endofchunk|>, <image>, <PAD>

    extra = {**checkpoint, "lang_encoder.old_decoder_blocks.0.attn.Wqkv.weight": torch.empty(1, device="meta")}
    with pytest.raises(InputError, match="checkpoint.pt.*unexpected keys.*old_decoder_blocks"):
        port_state(model, extra, mpt_weights, files)
    lacking = {key: value for key, value in checkpoint.items() if "blocks.23.gated_cross_attn_layer.ff_gate" not in key}
    with pytest.raises(InputError, match="checkpoint.pt.*missing keys.*cross_attn.23.ff_gate"):
        port_state(model, lacking, mpt_weights, files)


# -- loading errors and identity -------------------------------------------------------------------


def _copy_model(tmp_path: Path) -> Path:
    return shutil.copytree(REFERENCE / "model", tmp_path / "model")


def test_missing_files_are_input_errors_naming_the_file(tmp_path):
    with pytest.raises(InputError, match="needs a model directory"):
        load_backend("flamingo_3B")
    model = _copy_model(tmp_path)
    (model / "checkpoint.pt").unlink()
    with pytest.raises(InputError, match=r"checkpoint\.pt: missing"):
        load_backend("flamingo_3B", model_path=str(model))
    with pytest.raises(InputError, match=r"checkpoint\.pt: missing"):
        describe_settings("flamingo_3B", model_path=str(model), config={}, device="cpu")
    shutil.copy(REFERENCE / "model" / "checkpoint.pt", model / "checkpoint.pt")
    (model / "lang_encoder" / "pytorch_model.bin").unlink()
    with pytest.raises(InputError, match="lang_encoder: missing: MPT-1B weights"):
        load_backend("flamingo_3B", model_path=str(model))


def test_a_checkpoint_with_foreign_or_wrong_keys_is_an_input_error(tmp_path, flamingo):
    model = _copy_model(tmp_path)
    checkpoint, _ = official_state_dicts(flamingo.model)
    renamed = {key.replace("perceiver.norm.", "perceiver.final_norm."): value for key, value in checkpoint.items()}
    torch.save(renamed, model / "checkpoint.pt")
    with pytest.raises(InputError, match=r"checkpoint\.pt: unexpected keys.*perceiver\.final_norm\.weight"):
        load_backend("flamingo_3B", model_path=str(model))
    fewer_rows = {
        **checkpoint,
        "lang_encoder.transformer.wte.weight": checkpoint["lang_encoder.transformer.wte.weight"][:-1],
    }
    torch.save(fewer_rows, model / "checkpoint.pt")
    with pytest.raises(InputError, match="checkpoint and tokenizer do not belong together"):
        load_backend("flamingo_3B", model_path=str(model))


def test_describe_settings_names_the_files_and_follows_their_content(tmp_path):
    model = _copy_model(tmp_path)
    before = describe_settings("flamingo_3B", model_path=str(model), config={}, device="cpu")
    assert set(before["model"]) == {"checkpoint", "lang_encoder", "vision_encoder"}
    assert before["prompt"]["icd_template"].endswith("<|endofchunk|>")
    assert before["generation"] == {"max_new_tokens": 5, "num_beams": 3, "length_penalty": 0.0, "do_sample": False}
    torch.save({}, model / "checkpoint.pt")
    assert describe_settings("flamingo_3B", model_path=str(model), config={}, device="cpu")["model"] != before["model"]


# -- 3. end to end ---------------------------------------------------------------------------------


def test_the_generator_runs_with_the_demo_openflamingo(rl_inputs, tmp_path):
    from lever_lm.data.beam_data import load_beam_data
    from lever_lm.models.v3 import generate_rl_data
    from lever_lm.rl.checks import Expectations, load_rl_data, validate_rl_data
    from lever_lm.rl.records import RecordRules

    output = tmp_path / "rl.json"
    generate_rl_data.main([
        "--sft_ckpt", str(rl_inputs.sft_ckpt), "--beam_data", str(rl_inputs.beam_data), "--output_path", str(output),
        "--query_emb", str(rl_inputs.query_emb), "--cand_emb", str(rl_inputs.cand_emb), *rl_inputs.dataset_flags(),
        "--vqa_model", "flamingo_3B", "--vqa_model_path", str(rl_inputs.demo / "models" / "openflamingo-tiny"),
        "--num_beams", "2", "--temps", "1.0", "--num_samples_per_temp", "1", "--num_random", "1",
        "--limit", "4", "--device", "cpu", "--no_progress",
    ])  # fmt: skip
    data = load_rl_data(output)
    beam = load_beam_data(rl_inputs.beam_data, 274)
    validate_rl_data(output, data, Expectations(beam.query_ids[:4], RecordRules(beam.shot_num, 274)))
    candidates = [c for entry in data.values() for c in entry["pointer_candidates"]]
    assert len(data) == 4 and candidates and not any(c["eval_failed"] for c in candidates)
    assert all(0.0 <= c["vqa_gt_prob"] <= 1.0 for c in candidates), "Flamingo gives vqa_gt_prob too"
    meta = json.loads(output.with_name("rl.json.meta.json").read_text())
    assert meta["settings"]["vqa"]["vqa_model"] == "flamingo_3B"
