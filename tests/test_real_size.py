"""Real sizes at narrow widths: COCO-size photos, the 3B model's processor limits and token counts.

The model is Qwen2.5-VL-3B's architecture with narrow widths (`real_size`, narrow=True): every size
the image path depends on is real (14 px patches, 2x2 merge, 112 px windows, min/max pixels), so
bugs that only show at real image sizes show here, in seconds.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from lever_lm.demo import real_size
from lever_lm.vqa.prompts import FewShotPrompt, Shot

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def processor():
    return real_size.build_processor()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return real_size.write_photos(tmp_path_factory.mktemp("photos"), 14)


@pytest.fixture(scope="module")
def narrow_model(processor):
    config = real_size.qwen2_5_vl_3b_config(real_size.token_ids(processor), narrow=True)
    return real_size.build_random_model(config, torch.float32, "cpu", seed=0)


@pytest.fixture(scope="module")
def prompts(photos) -> list[FewShotPrompt]:
    rng = random.Random(0)
    out = []
    for k in range(6):
        icds = [photos[(k + 1) % 6], photos[(k + 2) % 6]]
        shots = tuple(Shot(path, *real_size.synthetic_question(rng)) for path in icds)
        out.append(FewShotPrompt(shots, Shot(photos[k % 6], real_size.synthetic_question(rng)[0])))
    return out


def test_the_config_is_the_published_3b_one():
    config = real_size.qwen2_5_vl_3b_config()
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (2048, 11008, 36)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (16, 2, 151936)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and config.tie_word_embeddings
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (32, 1280, 3420, 16)
    assert (vision.out_hidden_size, vision.window_size, list(vision.fullatt_block_indexes)) == (
        2048,
        112,
        [7, 15, 23, 31],
    )
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    assert 3.70e9 < parameters < 3.80e9, parameters  # "about 3.75B"
    assert (config.image_token_id, text.eos_token_id) == (151655, 151645)
    shallow = real_size.qwen2_5_vl_3b_config(layers=1, vision_layers=8)
    assert shallow.text_config.hidden_size == 2048 and shallow.text_config.num_hidden_layers == 1
    assert shallow.vision_config.depth == 8 and list(shallow.vision_config.fullatt_block_indexes) == [7]


def test_a_coco_photo_is_391_tokens_with_the_real_processor_limits(processor, photos):
    image_processor = processor.image_processor
    assert (image_processor.size["shortest_edge"], image_processor.size["longest_edge"]) == (3136, 12845056)
    from PIL import Image

    with Image.open(photos[0]) as photo:
        assert photo.size == (640, 480)
        processed = image_processor(images=[photo.convert("RGB")], return_tensors="pt")
    assert processed["image_grid_thw"].tolist() == [[1, 34, 46]]  # 476 x 644 px after resizing to multiples of 28
    assert list(processed["pixel_values"].shape) == [1564, 1176]


def test_real_size_prompts_through_the_backend(narrow_model, processor, prompts, photos):
    backend = real_size.random_weight_backend(narrow_model, processor, "cpu", batch_size=4)
    answers = backend.generate(prompts)
    assert all(g.error is None for g in answers) and all(g.raw for g in answers)
    image = backend.image_cache.get(photos[0])
    assert image.grid_thw.tolist() == [[1, 34, 46]] and image.num_tokens == 391
    assert list(image.features.shape) == [391, 64]
    inputs = backend._encode([backend._prepare(prompt) for prompt in prompts[:2]])
    assert (inputs["input_ids"] == backend.image_token_id).sum(dim=1).tolist() == [3 * 391, 3 * 391]
    assert 1250 < inputs["input_ids"].shape[1] < 1400, "about 1.3k tokens per two-shot prompt"
    # Batched, one at a time and without the shared prefill: the same answers (CPU, float32).
    assert [backend.generate([prompt])[0] for prompt in prompts] == answers
    backend.share_prefill = False
    assert backend.generate(prompts) == answers


def test_the_image_cache_keeps_its_budget_at_real_size(narrow_model, processor, photos):
    backend = real_size.random_weight_backend(
        narrow_model, processor, "cpu", config={"vqa_model": {"image_cache_mb": 1}}
    )
    per_image = 391 * 64 * 4 + 3 * 8  # float32 features and the int64 grid
    for path in photos:
        backend.image_cache.get(path)
        assert backend.image_cache.bytes <= 2**20
    assert len(backend.image_cache) == 2**20 // per_image == 10
    assert backend.image_cache.bytes == 10 * per_image
