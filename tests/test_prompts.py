"""Prompt builders (chat and OpenFlamingo forms) and the `vqa_model:` settings that shape them."""

from __future__ import annotations

from pathlib import Path

import pytest

from lever_lm.errors import InputError
from lever_lm.vqa.model_config import (
    CHAT_TEMPLATE,
    DEFAULT_GENERATION,
    DEFAULT_SYSTEM_PROMPT,
    FLAMINGO_TEMPLATE,
    resolve_settings,
)
from lever_lm.vqa.prompts import FewShotPrompt, PromptTemplate, Shot, chat_messages, fill, flamingo_text

TWO_SHOT = FewShotPrompt(
    shots=(Shot(Path("icd1.jpg"), "What color is it?", "red"), Shot(Path("icd2.jpg"), "How many?", "2")),
    query=Shot(Path("query.jpg"), "What shape is it?"),
)


def test_two_shot_chat_interleaves_images_and_texts_in_order():
    messages = chat_messages(TWO_SHOT, CHAT_TEMPLATE)
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM_PROMPT}]}
    assert len(messages) == 2 and messages[1]["role"] == "user"
    assert messages[1]["content"] == [
        {"type": "image", "image": "icd1.jpg"},
        {"type": "text", "text": "Question:What color is it? Short answer:red"},
        {"type": "image", "image": "icd2.jpg"},
        {"type": "text", "text": "Question:How many? Short answer:2"},
        {"type": "image", "image": "query.jpg"},
        {"type": "text", "text": "Question:What shape is it? Short answer:"},
    ]
    assert TWO_SHOT.images == (Path("icd1.jpg"), Path("icd2.jpg"), Path("query.jpg"))


def test_zero_shot_and_no_system_prompt():
    prompt = FewShotPrompt(shots=(), query=Shot(Path("q.jpg"), "Why?"))
    messages = chat_messages(prompt, PromptTemplate(None, "{question}={answer}", "{question}"))
    assert messages == [
        {"role": "user", "content": [{"type": "image", "image": "q.jpg"}, {"type": "text", "text": "Why?"}]}
    ]


def test_flamingo_string_form():
    assert flamingo_text(TWO_SHOT, FLAMINGO_TEMPLATE) == (
        "<image>Question:What color is it? Short answer:red<|endofchunk|>"
        "<image>Question:How many? Short answer:2<|endofchunk|>"
        "<image>Question:What shape is it? Short answer:"
    )


def test_fill_substitutes_once_and_keeps_other_braces():
    assert fill("{x} Q:{question} A:{answer}", "is {answer} here?", "no") == "{x} Q:is {answer} here? A:no"
    assert fill("Q:{question} A:{answer}", "why?") == "Q:why? A:"


# -- settings ----------------------------------------------------------------------------------


def test_defaults_follow_the_spec():
    settings = resolve_settings("chat")
    assert settings.generation == {"max_new_tokens": 5, "num_beams": 3, "length_penalty": 0.0, "do_sample": False}
    assert settings.prompt == CHAT_TEMPLATE and settings.path is None
    assert DEFAULT_GENERATION["num_beams"] == 3


def test_config_overrides_reach_the_prompt_and_flags_win():
    config = {
        "vqa_model": {
            "path": "/models/from-config",
            "system_prompt": "Answer briefly.",
            "icd_template": "Q: {question}\nA: {answer}\n",
            "query_template": "Q: {question}\nA:",
            "generation": {"num_beams": 1, "repetition_penalty": 1.0},
            "batch_size": 4,
        }
    }
    settings = resolve_settings("chat", config, batch_size=32)
    assert settings.generation == {**DEFAULT_GENERATION, "num_beams": 1, "repetition_penalty": 1.0}
    assert (settings.path, settings.batch_size) == ("/models/from-config", 32)
    messages = chat_messages(TWO_SHOT, settings.prompt)
    assert messages[0]["content"][0]["text"] == "Answer briefly."
    assert messages[1]["content"][1]["text"] == "Q: What color is it?\nA: red\n"
    assert messages[1]["content"][5]["text"] == "Q: What shape is it?\nA:"
    assert resolve_settings("chat", config, model_path="/flag").path == "/flag"
    assert (
        chat_messages(TWO_SHOT, resolve_settings("chat", {"vqa_model": {"system_prompt": None}}).prompt)[0]["role"]
        == "user"
    )


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"sytem_prompt": "x"}, "unknown key"),
        ({"icd_template": "Q:{question}"}, "{answer}"),
        ({"query_template": "no placeholder"}, "{question}"),
        ({"generation": {"num_beams": 0}}, "positive integer"),
        ({"generation": {"beams": 3}}, "not a generation setting"),
        ({"generation": {"do_sample": "no"}}, "true or false"),
        ({"generation": {"num_return_sequences": 2}}, "must be 1"),
        ({"batch_size": "8"}, "positive integer"),
        ({"processor_kwargs": [1]}, "mapping"),
    ],
)
def test_bad_settings_are_input_errors(section, message):
    with pytest.raises(InputError, match=message):
        resolve_settings("chat", {"vqa_model": section})


def test_bad_section_type():
    with pytest.raises(InputError, match="must be a mapping"):
        resolve_settings("chat", {"vqa_model": "qwen"})
