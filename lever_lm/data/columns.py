"""Compact columns: one buffer per column of a large table, not one Python object per value.

VQAv2's training split has 443,757 questions and 4.4M human answers. Kept as Python strings and
tuples, they are millions of objects: slow to build, to pickle for a Ray worker and to copy. Here
a column of strings is one UTF-8 buffer plus offsets (`TextColumn`), and a column of tuples of
repeated strings (the human answers) is codes into one vocabulary plus row offsets
(`CodedTuples`). Both are plain numpy arrays, so they pickle as buffers and save as an `.npz`
that is read back with `allow_pickle=False` (reading runs no code). `from_arrays` checks every
array it is given (dtype, shape, offsets, code ranges): a damaged file is refused, never trusted.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class ColumnError(ValueError):
    """Arrays that do not make a valid column (a damaged or foreign file)."""


class TextColumn:
    """Strings as one UTF-8 buffer (`data`) and `offsets` [n + 1]: string i is data[offsets[i]:offsets[i+1]]."""

    __slots__ = ("data", "offsets")

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = data, offsets

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> TextColumn:
        encoded = [s.encode("utf-8") for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")

    def tolist(self) -> list[str]:
        blob, bounds = self.data.tobytes(), self.offsets.tolist()
        return [blob[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:])]

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        return {f"{name}.data": self.data, f"{name}.offsets": self.offsets}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], name: str, length: int | None = None) -> TextColumn:
        data = _array(arrays, f"{name}.data", np.uint8)
        offsets = _offsets(arrays, f"{name}.offsets", len(data), length)
        try:
            data.tobytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise ColumnError(f"{name}: not UTF-8 ({error})") from None
        return cls(data, offsets)


class CodedTuples:
    """Tuples of strings from a small vocabulary: row i is vocabulary[codes[offsets[i]:offsets[i+1]]]."""

    __slots__ = ("vocabulary", "codes", "offsets")

    def __init__(self, vocabulary: list[str], codes: np.ndarray, offsets: np.ndarray):
        self.vocabulary, self.codes, self.offsets = vocabulary, codes, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[str, ...]:
        vocabulary = self.vocabulary
        return tuple(vocabulary[c] for c in self.codes[self.offsets[i] : self.offsets[i + 1]].tolist())

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        return {
            **TextColumn.from_strings(self.vocabulary).arrays(f"{name}.vocabulary"),
            f"{name}.codes": self.codes,
            f"{name}.offsets": self.offsets,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], name: str, length: int | None = None) -> CodedTuples:
        vocabulary = TextColumn.from_arrays(arrays, f"{name}.vocabulary").tolist()
        codes = check_codes(_array(arrays, f"{name}.codes", np.int32), len(vocabulary), f"{name}.codes")
        return cls(vocabulary, codes, _offsets(arrays, f"{name}.offsets", len(codes), length))


class Vocabulary:
    """Assigns codes to strings as they come (first seen, first code); `strings` in code order."""

    def __init__(self):
        self.index: dict[str, int] = {}
        self.strings: list[str] = []

    def code(self, text: str) -> int:
        code = self.index.get(text)
        if code is None:
            code = self.index[text] = len(self.strings)
            self.strings.append(text)
        return code


def check_codes(codes: np.ndarray, size: int, name: str, allow_none: bool = False) -> np.ndarray:
    """Codes must index a vocabulary of `size` (-1 stands for None where `allow_none`)."""
    if codes.size and (codes.min() < (-1 if allow_none else 0) or codes.max() >= size):
        raise ColumnError(f"{name}: codes outside the vocabulary of {size}")
    return codes


def int_array(arrays: dict[str, np.ndarray], name: str, dtype: type, length: int | None = None) -> np.ndarray:
    """A 1-D array of `dtype` (and `length`) from `arrays`."""
    array = _array(arrays, name, dtype)
    if length is not None and len(array) != length:
        raise ColumnError(f"{name}: {len(array)} rows, expected {length}")
    return array


def _array(arrays: dict[str, np.ndarray], name: str, dtype: type) -> np.ndarray:
    array = arrays.get(name)
    if not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim != 1:
        raise ColumnError(f"{name}: missing, or not a 1-D {np.dtype(dtype).name} array")
    return array


def _offsets(arrays: dict[str, np.ndarray], name: str, total: int, length: int | None) -> np.ndarray:
    offsets = _array(arrays, name, np.int64)
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != total or np.any(np.diff(offsets) < 0):
        raise ColumnError(f"{name}: offsets do not cut the {total} values into rows")
    if length is not None and len(offsets) != length + 1:
        raise ColumnError(f"{name}: {len(offsets) - 1} rows, expected {length}")
    return offsets
