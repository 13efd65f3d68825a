"""A small byte-level BPE vocabulary learned from the demo's own text.

Real checkpoints ship a tokenizer; the demo has to make one. A byte-level BPE covers every string
(nothing is ever unknown) and stays small enough for a tiny model. The `tokenizers` trainer is not
deterministic across processes (hash-map order decides ties), and demo builds must be
byte-identical, so the merges are learned here with a plain, tie-broken BPE loop; the corpus is a
few thousand short strings, so this takes well under a second.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, pre_tokenizers


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str],
    splitter: Tokenizer,
    end_of_word_suffix: str = "",
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a byte-level BPE: (vocab, merges), special tokens first, then bytes, then merges.

    `splitter` is the (empty) tokenizer the vocabulary is for: its normalizer and pre-tokenizer
    cut the text into words exactly as they will be cut at run time. `end_of_word_suffix` is
    "</w>" for CLIP-style vocabularies and empty for GPT/Qwen-style ones. Ties between equally
    frequent pairs go to the lexicographically smallest pair.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = list(special_tokens) + alphabet
    if end_of_word_suffix:
        symbols += [char + end_of_word_suffix for char in alphabet]
    words = _word_counts(texts, splitter, end_of_word_suffix)
    merges: list[tuple[str, str]] = []
    while len(symbols) < vocab_size:
        pairs = _pair_counts(words)
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        symbols.append(best[0] + best[1])
        words = Counter({_merge(word, best): n for word, n in words.items()})
    return {symbol: i for i, symbol in enumerate(symbols)}, merges


def _word_counts(texts: Iterable[str], splitter: Tokenizer, end_of_word_suffix: str) -> Counter:
    """Cut the texts into words as `splitter` does; each word becomes a tuple of symbols."""
    counts: Counter = Counter()
    for text in texts:
        if splitter.normalizer is not None:
            text = splitter.normalizer.normalize_str(text)
        for word, _ in splitter.pre_tokenizer.pre_tokenize_str(text):
            chars = list(word)
            if end_of_word_suffix:
                chars[-1] += end_of_word_suffix
            counts[tuple(chars)] += 1
    return counts


def _pair_counts(words: Counter) -> Counter:
    pairs: Counter = Counter()
    for word, n in words.items():
        for pair in zip(word, word[1:]):
            pairs[pair] += n
    return pairs


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)
