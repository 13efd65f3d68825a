"""Chat prompts to text and token ids, with the user's strings always plain text, and the tokens of a reply.

Both chat backends render a prompt with the model's chat template and tokenise the result. Two
things need care there. (The first alone, `ControlTokenText`, serves OpenFlamingo too: its prompt is
text around `<image>` and `<|endofchunk|>` markers, which a question or an answer must not add.)

**The user's strings never become control tokens.** A question, an answer, a template or the
system prompt may contain the text of an added token: `<|image_pad|>`, `<|im_end|>`, ... A
tokenizer turns such text into the token itself, wherever it stands, so a question holding
`<|image_pad|>` gave its prompt one image token too many (and broke its whole batch), and one
holding `<|im_end|>` closed the user turn. So before rendering, every control-token text inside a
user string is replaced by an escape: one private-use character per control token. In the
rendered chat, control-token texts are then exactly those the template wrote. Tokenising a text
with escapes cuts it at those control tokens, as the tokenizer itself does, and encodes each piece
between them, escapes turned back into their text, with the tokenizer's normaliser, pre-tokeniser
and model alone: as plain text, in its context, exactly as the tokenizer would encode it if the
control tokens did not exist. A text without escapes (every ordinary prompt) goes through the
tokenizer unchanged, so ordinary prompts get the very ids they always had. Control tokens are all
the tokenizer's added tokens except pure whitespace ones (some tokenizers add "\\n" as a token,
and it is ordinary text). A user string holding one of the private-use escape characters itself
cannot be escaped unambiguously and is refused (`ValueError`).

**The tokens of a reply** (for its teacher-forced likelihood). The conversation "prompt, then an
assistant message r" is rendered by the same template; its text must start with the prompt's text
and r, and its tokens with the prompt's tokens. The reply's tokens are what follows, up to and
including the first control token: the end of the assistant's turn (`<|im_end|>` for Qwen). What
the template writes after that token (Qwen's "\\n") is not part of the reply. A template that
breaks any of these rules gives a `ReplyEncodingError`, and no likelihood for that prompt.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

ESCAPE_BASE = 0xF0100  # Supplementary Private Use Area-A; one character per control token
# Replies that a template transforming its content (stripping, escaping, parsing) would not keep as they are.
_PROBE_REPLIES = ("yes", "  Two, {{ 3 }}.\n<b>x</b>  ", "")
_PAD_ARGUMENTS = (
    "padding",
    "max_length",
    "pad_to_multiple_of",
    "padding_side",
    "return_attention_mask",
    "return_tensors",
)


class ReplyEncodingError(ValueError):
    """The chat template does not render a reply so that its tokens can be told apart exactly."""


class ControlTokenText:
    """A tokenizer whose user strings stay plain text: control-token texts in them are escaped, and
    escaped texts are tokenised as plain text (see the module doc). OpenFlamingo's prompts use it
    alone; the chat backends through `ChatEncoder`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        added = self.tokenizer.get_added_vocab()  # text -> id
        controls = sorted(text for text in added if text and not text.isspace())
        self.control_ids = {text: added[text] for text in controls}
        self._control_id_set = frozenset(self.control_ids.values())
        self._escape_of = {text: chr(ESCAPE_BASE + i) for i, text in enumerate(controls)}
        self._text_of = {escape: text for text, escape in self._escape_of.items()}
        longest_first = sorted(controls, key=len, reverse=True)
        self._control = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
        last = chr(ESCAPE_BASE + max(len(controls) - 1, 0))
        self._escapes = re.compile(f"[{chr(ESCAPE_BASE)}-{last}]" if controls else "(?!)")
        # The tokenizer cuts a text at its added tokens and encodes the pieces independently, unless a
        # token also swallows neighbouring spaces or must stand alone as a word.
        flags = [token for token in self.tokenizer.added_tokens_decoder.values() if token.content in self.control_ids]
        self._cuts_are_independent = not any(
            getattr(token, name, False) for token in flags for name in ("lstrip", "rstrip", "single_word")
        )
        self._framing: tuple[list[int], list[int]] | None = None

    # -- user strings ----------------------------------------------------------------------------

    def escape(self, text: str) -> str:
        """`text` with each control-token text replaced by its escape character."""
        found = self._escapes.search(text)
        if found:
            raise ValueError(
                f"the text {text[:80]!r} holds the private-use character U+{ord(found.group()):05X}, "
                "which marks control-token text; remove it"
            )
        return self._control.sub(lambda match: self._escape_of[match.group()], text)

    def has_escapes(self, text: str) -> bool:
        return self._escapes.search(text) is not None

    # -- tokenising ------------------------------------------------------------------------------

    def tokenize(self, texts: str | Sequence[str], **kwargs) -> Any:
        """The tokenizer's call on (possibly escaped) chat texts: the same output, escapes as plain text."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not any(self.has_escapes(text) for text in batch):
            return self.tokenizer(texts, **kwargs)
        add_special_tokens = kwargs.pop("add_special_tokens", True)
        ids = [self.encode(text, add_special_tokens=add_special_tokens) for text in batch]
        pad_kwargs = {key: value for key, value in kwargs.items() if key in _PAD_ARGUMENTS}
        return self.tokenizer.pad({"input_ids": ids[0] if isinstance(texts, str) else ids}, **pad_kwargs)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The ids of one chat text; escapes are encoded as the plain text they stand for."""
        if not self.has_escapes(text):
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        ids = self._encode_pieces(text)
        if add_special_tokens:
            prefix, suffix = self._special_framing()
            ids = prefix + ids + suffix
        return ids

    def _encode_pieces(self, text: str) -> list[int]:
        """Control tokens as their ids, the text between them as plain text (what the tokenizer does, but
        with escapes turned back into text only after the cut)."""
        ids: list[int] = []
        start = 0
        for match in self._control.finditer(text):
            ids += self._plain_ids(text[start : match.start()])
            ids.append(self.control_ids[match.group()])
            start = match.end()
        return ids + self._plain_ids(text[start:])

    def _plain_ids(self, piece: str) -> list[int]:
        """`piece` (escapes turned into their text) encoded as if the tokenizer had no added tokens."""
        if not piece:
            return []
        piece = self._escapes.sub(lambda match: self._text_of[match.group()], piece)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a Python tokenizer: no pipeline to run piecewise; special tokens are split
            return self.tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=True)
        if backend.normalizer is not None:
            piece = backend.normalizer.normalize_str(piece)
        words = (
            [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(piece)] if backend.pre_tokenizer else [piece]
        )
        return [token.id for word in words for token in backend.model.tokenize(word)]

    def _special_framing(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a text when asked to add special tokens (e.g. BOS)."""
        if self._framing is None:
            plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
            framed = self.tokenizer("a", add_special_tokens=True)["input_ids"]
            start = next(i for i in range(len(framed) - len(plain) + 1) if framed[i : i + len(plain)] == plain)
            self._framing = (framed[:start], framed[start + len(plain) :])
        return self._framing


class ChatEncoder(ControlTokenText):
    """A processor's chat template and tokenizer, used so that user strings stay plain text (see the module doc)."""

    def __init__(self, processor):
        super().__init__(processor.tokenizer)
        self.processor = processor
        self._verbatim: bool | None = None
        self._processor_with_escapes = None

    def escape_messages(self, messages: list[dict]) -> list[dict]:
        """A copy of chat messages with every text escaped (roles and entry types are the template's)."""
        out = []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                content = self.escape(content)
            else:
                content = [
                    {**entry, "text": self.escape(entry["text"])} if "text" in entry else entry for entry in content
                ]
            out.append({**message, "content": content})
        return out

    def render_prompt(self, messages: list[dict]) -> str:
        """The chat text with the generation prompt, user strings escaped."""
        return self._render(self.escape_messages(messages), add_generation_prompt=True)

    def processor_for(self, texts: Sequence[str]):
        """The processor to run on `texts`: itself, or, when a text holds escapes, a copy whose tokenizer
        call is `tokenize` (so image placeholders are counted and expanded among the template's tokens only)."""
        if not any(self.has_escapes(text) for text in texts):
            return self.processor
        if self._processor_with_escapes is None:
            clone = copy.copy(self.processor)
            clone.tokenizer = _EscapeAwareTokenizer(self)
            self._processor_with_escapes = clone
        return self._processor_with_escapes

    # -- replies ---------------------------------------------------------------------------------

    def reply_tokens(
        self, messages: list[dict], prompt_text: str, replies: Sequence[str]
    ) -> tuple[tuple[int, ...], ...]:
        """For each reply, the ids that follow the prompt's ids when the assistant answers exactly it:
        the reply's tokens and the end-of-turn token (see the module doc). `prompt_text` is
        `render_prompt(messages)`.

        The tokenizer encodes the pieces between added tokens independently, so only the texts from
        the prompt's last control token on are tokenised: the same ids, at a fraction of the cost.
        """
        conversations = self._conversations(
            self.escape_messages(messages), prompt_text, [self.escape(r) for r in replies]
        )
        cut = self._last_cut(prompt_text)
        prompt_ids, *conversation_ids = self._encode_many([prompt_text[cut:]] + [text[cut:] for text in conversations])
        out = []
        for ids in conversation_ids:
            if ids[: len(prompt_ids)] != prompt_ids:
                raise ReplyEncodingError("the prompt's tokens are not a prefix of the conversation's tokens")
            rest = ids[len(prompt_ids) :]
            end = next((i for i, token in enumerate(rest) if token in self._control_id_set), None)
            if end is None:
                raise ReplyEncodingError("the chat template puts no control token (end of turn) after the reply")
            out.append(tuple(rest[: end + 1]))
        return tuple(out)

    def _conversations(self, messages: list[dict], prompt_text: str, replies: list[str]) -> list[str]:
        """The rendered conversations "the prompt, then the assistant's reply r", one per (escaped) reply.

        Rendering costs more than all the rest of a reply's likelihood, so when the template writes
        a reply verbatim and the same text after any reply (checked once, on probe replies), only the
        first reply's conversation is rendered; the others are the prompt, the reply and that tail.
        """
        if not replies:
            return []
        first = self._conversation(messages, prompt_text, replies[0])
        if not self._verbatim_replies(messages, prompt_text):
            return [first] + [self._conversation(messages, prompt_text, reply) for reply in replies[1:]]
        tail = first[len(prompt_text) + len(replies[0]) :]
        return [first] + [prompt_text + reply + tail for reply in replies[1:]]

    def _conversation(self, messages: list[dict], prompt_text: str, reply: str) -> str:
        assistant = {"role": "assistant", "content": [{"type": "text", "text": reply}]}
        conversation = self._render([*messages, assistant], add_generation_prompt=False)
        if not conversation.startswith(prompt_text + reply):
            raise ReplyEncodingError(
                "the chat template does not write the assistant's reply verbatim right after the generation prompt"
            )
        return conversation

    def _verbatim_replies(self, messages: list[dict], prompt_text: str) -> bool:
        """Whether the template writes any reply verbatim followed by the same text (decided once)."""
        if self._verbatim is None:
            tails = set()
            try:
                for probe in _PROBE_REPLIES:
                    tails.add(self._conversation(messages, prompt_text, probe)[len(prompt_text) + len(probe) :])
                self._verbatim = len(tails) == 1
            except ReplyEncodingError:
                self._verbatim = False
        return self._verbatim

    def _last_cut(self, text: str) -> int:
        """Where the text after the last control token starts (0 when the tokenizer's pieces interact)."""
        if not self._cuts_are_independent:
            return 0
        return max((match.start() for match in self._control.finditer(text)), default=0)

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        if any(self.has_escapes(text) for text in texts):
            return [self.encode(text) for text in texts]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


class _EscapeAwareTokenizer:
    """The tokenizer as a processor sees it, except that calling it is `ChatEncoder.tokenize`."""

    def __init__(self, encoder: ChatEncoder):
        self._encoder = encoder

    def __call__(self, text, **kwargs):
        return self._encoder.tokenize(text, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._encoder.tokenizer, name)
