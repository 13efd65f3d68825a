"""Reply likelihoods of both chat backends against a brute-force reference, on the demo's tiny Qwen2.5-VL.

The reference is independent of the backends' code: the processor renders and tokenises the prompt
and the conversation "prompt, then the assistant's reply", and the model runs on the whole
conversation with no cache; the log-probabilities of the reply's tokens and the end-of-turn token
are summed.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicSlidingWindowLayer

from lever_lm.demo.dataset import Split
from lever_lm.vqa.backends import image_text_to_text, load_backend
from lever_lm.vqa.backends.chat_encoding import ReplyEncodingError
from lever_lm.vqa.backends.reply_likelihood import prompt_cache
from lever_lm.vqa.expected_accuracy import distinct_answers
from lever_lm.vqa.images import read_rgb
from lever_lm.vqa.prompts import FewShotPrompt, Shot, chat_messages

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Multi-token, punctuation, a leading space, one character, nothing at all.
EXTRA_REPLIES = ("red and white", "a, b!", " yes", "x", "")
TOLERANCE = 1e-4  # float32, as the issue asks


@pytest.fixture(scope="module")
def model_dir(demo_dir) -> Path:
    return demo_dir / "models" / "qwen2.5-vl-tiny"


@pytest.fixture(scope="module")
def work(demo_dir) -> tuple[list[FewShotPrompt], list[tuple[str, ...]]]:
    """Six demo prompts with 0 to 3 ICDs, each with its query's distinct answers and the extra replies."""
    split = Split("train", demo_dir / "vqa")
    questions = json.loads(split.questions_path.read_text(encoding="utf-8"))["questions"]
    annotations = {
        a["question_id"]: a for a in json.loads(split.annotations_path.read_text(encoding="utf-8"))["annotations"]
    }
    rng = random.Random(1)
    prompts, replies = [], []
    for k in range(6):
        query = rng.choice(questions)
        icds = rng.sample(questions, k % 4)
        shots = tuple(
            Shot(
                split.image_path(q["image_id"]), q["question"], annotations[q["question_id"]]["multiple_choice_answer"]
            )
            for q in icds
        )
        prompts.append(FewShotPrompt(shots, Shot(split.image_path(query["image_id"]), query["question"])))
        answers = [a["answer"] for a in annotations[query["question_id"]]["answers"]]
        replies.append(tuple(dict.fromkeys(distinct_answers(answers) + EXTRA_REPLIES)))
    return prompts, replies


@pytest.fixture(scope="module")
def qwen(model_dir):
    return load_backend("qwen2.5_vl_3B", model_path=str(model_dir), batch_size=16)


@pytest.fixture(scope="module")
def generic(model_dir):
    return load_backend("hf_image_text_to_text", model_path=str(model_dir), batch_size=4)


@pytest.fixture(scope="module")
def qwen_scored(qwen, work):
    prompts, replies = work
    return qwen.generate(prompts, replies)


def brute_force_logprob(backend, prompt: FewShotPrompt, reply: str) -> float:
    """log P(reply, end of turn | prompt) from one uncached forward pass over the whole conversation."""
    processor = backend.processor
    messages = chat_messages(prompt, backend.settings.prompt)
    assistant = {"role": "assistant", "content": [{"type": "text", "text": reply}]}
    prompt_text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = processor.apply_chat_template([*messages, assistant], tokenize=False)
    assert full_text.startswith(prompt_text + reply)
    images = [read_rgb(path) for path in prompt.images]
    prompt_ids = processor(text=[prompt_text], images=[images], return_tensors="pt")["input_ids"][0]
    full = processor(text=[full_text], images=[images], return_tensors="pt")
    ids = full["input_ids"][0]
    n = len(prompt_ids)
    assert torch.equal(ids[:n], prompt_ids), "the prompt's tokens must be a prefix of the conversation's"
    end = n + ids[n:].tolist().index(backend.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    with torch.inference_mode():
        logits = backend.model(**full, use_cache=False).logits[0].float()
    logprobs = torch.log_softmax(logits[n - 1 : end], dim=-1)
    return float(logprobs.gather(-1, ids[n : end + 1].unsqueeze(-1)).sum())


@pytest.mark.parametrize("which", ["qwen", "generic"])
def test_reply_likelihoods_equal_the_brute_force_reference(which, request, work, generic, qwen_scored):
    backend = request.getfixturevalue(which)
    prompts, replies = work
    scored = qwen_scored if which == "qwen" else backend.generate(prompts, replies)
    errors = []
    for prompt, prompt_replies, generation in zip(prompts, replies, scored):
        assert generation.error is None and len(generation.reply_logprobs) == len(prompt_replies)
        for reply, logprob in zip(prompt_replies, generation.reply_logprobs):
            errors.append(abs(logprob - brute_force_logprob(generic, prompt, reply)))
    assert len(errors) >= 40
    assert max(errors) < TOLERANCE


def test_reply_tokens_are_the_reply_and_the_end_of_turn_token(qwen, work):
    prompts, _ = work
    replies = ("yes", " yes", "a, b!", "")
    tokens = qwen._prepare(prompts[1], replies).reply_tokens
    end = qwen.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(reply[-1] == end and end not in reply[:-1] for reply in tokens)
    assert [qwen.tokenizer.decode(reply[:-1]) for reply in tokens] == list(
        replies
    )  # the "\n" after the end is not counted
    assert tokens[-1] == (end,)


def test_batched_equals_one_at_a_time_and_both_backends_agree(qwen, generic, work, qwen_scored):
    prompts, replies = work
    alone = [qwen.generate([prompt], [prompt_replies])[0] for prompt, prompt_replies in zip(prompts, replies)]
    generic_scored = generic.generate(prompts, replies)
    for batched, single, other in zip(qwen_scored, alone, generic_scored):
        assert batched.raw == single.raw == other.raw
        assert batched.reply_logprobs == pytest.approx(single.reply_logprobs, abs=1e-5)
        assert batched.reply_logprobs == pytest.approx(other.reply_logprobs, abs=1e-5)


def test_replies_never_change_the_answers(qwen, work, qwen_scored):
    prompts, replies = work
    plain = qwen.generate(prompts)
    assert [g.raw for g in plain] == [g.raw for g in qwen_scored]
    assert all(g.reply_logprobs is None for g in plain)
    mixed = qwen.generate(prompts[:3], [replies[0], None, ()])
    assert [g.raw for g in mixed] == [g.raw for g in plain[:3]]
    assert mixed[0].reply_logprobs == pytest.approx(qwen_scored[0].reply_logprobs, abs=1e-5)
    assert mixed[1].reply_logprobs is None and mixed[2].reply_logprobs == ()
    with pytest.raises(ValueError, match="2 prompts but 1 lists of replies"):
        qwen.generate(prompts[:2], [replies[0]])


def test_deterministic_and_duplicates_scored_alike(qwen, work, qwen_scored):
    prompts, replies = work
    assert qwen.generate(prompts, replies) == qwen_scored
    doubled = qwen.generate(prompts[:1], [replies[0] + replies[0]])[0].reply_logprobs
    assert doubled[: len(replies[0])] == doubled[len(replies[0]) :]


@pytest.mark.parametrize(
    ("precompute_vision", "share_prefill", "generation_cache"),
    [(False, True, True), (True, False, True), (True, True, False)],
)
def test_every_qwen_path_gives_the_same_likelihoods(
    model_dir, work, qwen_scored, monkeypatch, precompute_vision, share_prefill, generation_cache
):
    """Pixels instead of cached features; beam search with a prefill per beam; and a prefill of the
    replies' own instead of the cache generation leaves (for caches that cannot be cut back)."""
    prompts, replies = work
    backend = load_backend("qwen2.5_vl_3B", model_path=str(model_dir), batch_size=16)
    backend.precompute_vision, backend.share_prefill = precompute_vision, share_prefill
    if not generation_cache:
        monkeypatch.setattr(image_text_to_text, "prompt_cache", lambda output, shape: None)
    for got, expected in zip(backend.generate(prompts, replies), qwen_scored):
        assert got.raw == expected.raw
        assert got.reply_logprobs == pytest.approx(expected.reply_logprobs, abs=1e-5)


def test_probabilities_of_distinct_replies_sum_to_at_most_one(model_dir, work):
    """With the end-of-turn token as likely as all other tokens together, whatever the hidden state,
    the empty reply holds about half the probability and the one-token strings most of the rest: the
    sum over distinct replies comes well above 0.5 and stays at most 1."""
    prompts, _ = work
    backend = load_backend("qwen2.5_vl_3B", model_path=str(model_dir))
    tokenizer = backend.tokenizer
    head = backend.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
    with torch.no_grad():  # every logit 0 but the end token's, log(vocabulary): P(end) ~ 1/2 at every step
        biased.weight.zero_()
        biased.bias.zero_()
        biased.bias[tokenizer.convert_tokens_to_ids("<|im_end|>")] = math.log(head.out_features)
    backend.model.lm_head = biased
    controls = set(backend.chat.control_ids.values())
    strings = {tokenizer.decode([t]).strip() for t in range(len(tokenizer)) if t not in controls}
    replies = ("", *sorted(strings - {""}))
    for generation in backend.generate(prompts[:2], [replies, replies]):
        total = math.fsum(math.exp(logprob) for logprob in generation.reply_logprobs)
        assert 0.5 < total <= 1 + 1e-6


def test_a_template_that_hides_the_reply_gives_no_likelihood(model_dir, work, caplog):
    """E.g. a template that writes something before an assistant's content: the reply's tokens cannot
    be told apart exactly, so there is no likelihood, a warning, and the same answer."""
    prompts, replies = work
    backend = load_backend("qwen2.5_vl_3B", model_path=str(model_dir))
    plain = backend.generate(prompts[:2])
    template = backend.processor.chat_template
    backend.processor.chat_template = template.replace(
        "<|im_start|>{{ message['role'] }}\n",
        "<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' %}<think></think>{% endif %}",
    )
    with caplog.at_level("WARNING"):
        out = backend.generate(prompts[:2], replies[:2])
    assert [g.raw for g in out] == [g.raw for g in plain]
    assert all(g.error is None and g.reply_logprobs is None for g in out)
    assert "no reply likelihoods" in caplog.text and "verbatim" in caplog.text
    with pytest.raises(ReplyEncodingError):
        messages = chat_messages(prompts[0], backend.settings.prompt)
        backend.chat.reply_tokens(messages, backend.chat.render_prompt(messages), ["yes"])


def test_a_template_that_changes_replies_is_rendered_per_reply(model_dir, work):
    """A template that strips the assistant's content writes " yes" as "yes": each reply's conversation
    is then rendered (none is derived from another), and " yes" has no likelihood of its own."""
    prompts, _ = work
    backend = load_backend("qwen2.5_vl_3B", model_path=str(model_dir), batch_size=16)
    backend.processor.chat_template = backend.processor.chat_template.replace(
        "{{ content['text'] }}", "{{ content['text'] | trim }}"
    )
    messages = chat_messages(prompts[0], backend.settings.prompt)
    text = backend.chat.render_prompt(messages)
    tokens = backend.chat.reply_tokens(messages, text, ("yes", "x"))
    assert backend.chat._verbatim is False
    assert [backend.tokenizer.decode(t[:-1]) for t in tokens] == ["yes", "x"]
    with pytest.raises(ReplyEncodingError, match="verbatim"):
        backend.chat.reply_tokens(messages, text, (" yes",))


def test_the_generation_cache_is_cut_back_to_the_prompts():
    """2 prompts x 3 beams, 7 cached positions, prompts of 5 tokens: one row per prompt, 4 positions."""
    keys = torch.arange(6 * 7, dtype=torch.float32).reshape(6, 1, 7, 1)
    cache = DynamicCache()
    for layer in range(2):
        cache.update(keys + layer, -keys, layer_idx=layer)
    cut = prompt_cache(SimpleNamespace(cache=cache), torch.Size([2, 5]))
    assert cut is cache and cut.get_seq_length() == 4
    assert torch.equal(cut.layers[1].keys, (keys + 1)[[0, 3], :, :4])
    assert torch.equal(cut.layers[0].values, -keys[[0, 3], :, :4])
    # No cache, or layers that do not keep every position: the caller prefills instead.
    assert prompt_cache(SimpleNamespace(), torch.Size([2, 5])) is None
    sliding = Cache(layers=[DynamicSlidingWindowLayer(sliding_window=4)])
    sliding.update(keys, keys, layer_idx=0)
    assert prompt_cache(SimpleNamespace(cache=sliding), torch.Size([2, 5])) is None
