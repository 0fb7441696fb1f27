"""Text machinery of the clean stage: normalization (one text or an Arrow batch), character
classes, and `TextBatch`, a batch's numpy views with the n-gram engine the filters share.

`TextBatch` holds the normalized texts of a batch as Arrow strings, with per-character,
per-word and per-line views computed on first use in numpy.

Character classes (whitespace, `\\w`, letters) are tables built from Python's own `re`,
so vectorized decisions are exactly those of the per-document rules they replace.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from functools import cached_property, lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")

# The same rules in RE2 (Arrow) syntax, for whole batches.
_RE2_CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x{9f}\x{200b}\x{feff}]"
_RE2_SPACE = r"[ \t\x{a0}\x{2000}-\x{200a}\x{3000}]"
# A lone " " is already normalized: only longer runs and other spaces are rewritten (fast).
_RE2_SPACES = rf"{_RE2_SPACE}{_RE2_SPACE}+|[\t\x{{a0}}\x{{2000}}-\x{{200a}}\x{{3000}}]"
# A superset of the texts that `normalize` changes; the others skip the rewrite passes.
_RE2_MAY_CHANGE = r"[^\n\x20-\x7e]|  | \n|\n\n\n|^[ \n]|[ \n]$"

# Bits of the per-code-point class table (see `char_classes`).
WHITESPACE = 1  # Python `\s` (str.isspace)
WORD_CHAR = 2  # Python `\w`
LETTER = 4  # Python `[^\W\d_]`
ALNUM = 8  # Python `[^\W_]`


@lru_cache(maxsize=1)
def char_classes() -> np.ndarray:
    """uint8 flags for every code point, taken from Python's `re` so the semantics match."""
    table = np.zeros(sys.maxunicode + 1, dtype=np.uint8)
    codepoints = np.r_[np.arange(0xD800), np.arange(0xE000, sys.maxunicode + 1)].astype("<u4")
    every = codepoints.tobytes().decode("utf-32-le")  # every code point but the surrogates
    for bit, pattern in ((WHITESPACE, r"\s+"), (WORD_CHAR, r"\w+"), (LETTER, r"[^\W\d_]+"), (ALNUM, r"[^\W_]+")):
        spans = np.array([match.span() for match in re.finditer(pattern, every)], dtype=np.int64).reshape(-1, 2)
        marks = np.zeros(len(every) + 1, dtype=np.int64)
        np.add.at(marks, spans[:, 0], 1)
        np.add.at(marks, spans[:, 1], -1)
        table[codepoints[np.cumsum(marks[:-1]) > 0]] |= bit
    return table


@lru_cache(maxsize=1)
def python_whitespace() -> str:
    """Every character `str.strip()` removes."""
    return "".join(chr(c) for c in np.flatnonzero(char_classes() & WHITESPACE))


def normalize(text: str) -> str:
    """NFC, control characters removed, runs of spaces collapsed, at most one blank line.

    Newlines are kept: line structure is what the repetition filters (and code in
    docstrings) rely on. `normalize_batch` does the same to a whole Arrow array.
    """
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def normalize_batch(texts: pa.Array) -> pa.Array:
    """`normalize` applied to every string of `texts` (large_string), with Arrow kernels."""
    may_change = pc.match_substring_regex(texts, _RE2_MAY_CHANGE)
    if not pc.any(may_change).as_py():
        return texts
    part = texts.filter(may_change)
    part = pc.replace_substring(pc.replace_substring(part, "\r\n", "\n"), "\r", "\n")
    part = _nfc(part)
    part = pc.replace_substring_regex(part, _RE2_CONTROL, "")
    part = pc.replace_substring_regex(part, _RE2_SPACES, " ")
    part = pc.replace_substring_regex(part, r"[ \t]+\n", "\n")
    part = pc.replace_substring_regex(part, r"\n\n\n+", "\n\n")
    part = pc.utf8_trim(part, python_whitespace())
    return pc.replace_with_mask(texts, may_change, part.cast(texts.type))


def _nfc(texts: pa.Array) -> pa.Array:
    """NFC of the non-ASCII strings, in Python: Arrow 25's utf8_normalize("NFC") decomposes
    ("\xf6" -> "o\u0308") instead of composing."""
    non_ascii = pc.invert(pc.string_is_ascii(texts))
    if not pc.any(non_ascii).as_py():
        return texts
    composed = [unicodedata.normalize("NFC", text) for text in texts.filter(non_ascii).to_pylist()]
    return pc.replace_with_mask(texts, non_ascii, pa.array(composed, texts.type))


def segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sum of `values[offsets[k]:offsets[k + 1]]` for every k (empty segments give 0)."""
    cumulative = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(values, out=cumulative[1:])
    return cumulative[offsets[1:]] - cumulative[offsets[:-1]]


def _dense_ids(strings: pa.Array) -> np.ndarray:
    return pc.dictionary_encode(strings).indices.to_numpy(zero_copy_only=False).astype(np.int64)


class TextBatch:
    """Normalized texts of one batch, with the numpy views the filters share.

    Code points of all texts are concatenated; `char_offsets[d]:char_offsets[d + 1]` is
    document d. Words are Python's `text.split()`; lines are `text.split("\\n")`.
    """

    def __init__(self, texts: pa.Array) -> None:
        self.texts = texts.cast(pa.large_string())
        self.size = len(self.texts)

    @classmethod
    def from_strings(cls, texts: list[str]) -> TextBatch:
        return cls(pa.array(texts, pa.large_string()))

    @cached_property
    def _data(self) -> tuple[pa.Buffer, int, bytes]:
        offsets = np.frombuffer(self.texts.buffers()[1], dtype=np.int64)[self.texts.offset :]
        start, end = int(offsets[0]), int(offsets[self.size])
        data = self.texts.buffers()[2]
        raw = b"" if data is None else data[start:end].to_pybytes()
        return data, start, raw

    @cached_property
    def codepoints(self) -> np.ndarray:
        return np.frombuffer(self._data[2].decode("utf-8").encode("utf-32-le"), dtype=np.uint32)

    @cached_property
    def char_offsets(self) -> np.ndarray:
        lengths = pc.utf8_length(self.texts).to_numpy(zero_copy_only=False)
        offsets = np.zeros(self.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return offsets

    @cached_property
    def char_counts(self) -> np.ndarray:
        return np.diff(self.char_offsets)

    @cached_property
    def flags(self) -> np.ndarray:
        return char_classes()[self.codepoints]

    @cached_property
    def _wide_chars(self) -> list[np.ndarray]:
        cps = self.codepoints
        return [np.flatnonzero(cps >= bound) for bound in (0x80, 0x800, 0x10000)]

    def byte_positions(self, positions: np.ndarray) -> np.ndarray:
        """Byte offset (in the Arrow data buffer) of code point positions (len(codepoints) allowed)."""
        result = positions + self._data[1]
        for wide in self._wide_chars:  # each non-ASCII character adds one byte per bound it passes
            if len(wide):
                result = result + np.searchsorted(wide, positions)
        return result

    def substring_ids(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Dense ids of the substrings [starts, ends) (code point positions): equal strings, equal ids."""
        if len(starts) == 0:
            return np.zeros(0, dtype=np.int64)
        bounds = np.empty(2 * len(starts), dtype=np.int64)
        bounds[0::2] = self.byte_positions(starts)
        bounds[1::2] = self.byte_positions(ends)
        # Strings alternate: substring, gap, substring, ...; the gaps are encoded and ignored.
        strings = pa.LargeStringArray.from_buffers(len(bounds) - 1, pa.py_buffer(bounds), self._data[0])
        return _dense_ids(strings)[0::2]

    # Words: maximal runs of non-whitespace inside a document.
    @cached_property
    def _words(self) -> tuple[np.ndarray, np.ndarray]:
        space = (self.flags & WHITESPACE).astype(bool)
        n = len(space)
        boundary = np.zeros(n + 1, dtype=bool)
        boundary[self.char_offsets] = True
        before = np.ones(n, dtype=bool)
        before[1:] = space[:-1]
        after = np.ones(n, dtype=bool)
        after[:-1] = space[1:]
        starts = np.flatnonzero(~space & (before | boundary[:-1]))
        ends = np.flatnonzero(~space & (after | boundary[1:])) + 1
        return starts, ends

    @property
    def word_starts(self) -> np.ndarray:
        return self._words[0]

    @cached_property
    def word_lengths(self) -> np.ndarray:
        return self._words[1] - self._words[0]

    @cached_property
    def word_offsets(self) -> np.ndarray:
        """Words of document d are `word_offsets[d]:word_offsets[d + 1]`."""
        return np.searchsorted(self.word_starts, self.char_offsets)

    @cached_property
    def word_counts(self) -> np.ndarray:
        return np.diff(self.word_offsets)

    @cached_property
    def word_doc(self) -> np.ndarray:
        return np.repeat(np.arange(self.size), self.word_counts)

    @cached_property
    def word_chars(self) -> np.ndarray:
        """Sum of word lengths per document."""
        return segment_sums(self.word_lengths, self.word_offsets)

    @cached_property
    def word_ids(self) -> np.ndarray:
        return self.substring_ids(*self._words)

    def repeated_ngrams(self, alive: np.ndarray, n_max: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """`repeated_ngrams` for n = 1..n_max, shared by the n-gram filters: computed for the
        first `alive` asked, which later (smaller) alive sets reuse by filtering positions."""
        cached = self.__dict__.get("_ngrams")
        if cached is None or (alive & ~cached[0]).any():
            cached = (alive.copy(), repeated_ngrams(self, alive, 10**9), [])
            self.__dict__["_ngrams"] = cached
        base, generator, results = cached
        while len(results) < n_max:
            results.append(next(generator))
        if (alive == base).all():
            return results[:n_max]
        return [(positions[keep], counts[keep]) for positions, counts in results[:n_max]
                for keep in [alive[self.word_doc[positions]]]]

    def count_chars(self, mask: np.ndarray) -> np.ndarray:
        """Per document, how many of its characters are in `mask`."""
        return np.diff(np.searchsorted(np.flatnonzero(mask), self.char_offsets))

    def count_in_spans(self, mask: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Per span [starts, ends) of code points, how many are in `mask`."""
        marked = np.flatnonzero(mask)
        return np.searchsorted(marked, ends) - np.searchsorted(marked, starts)


def words_alive(batch: TextBatch, alive: np.ndarray) -> np.ndarray:
    return np.repeat(alive, batch.word_counts)


def repeated_ngrams(batch: TextBatch, alive: np.ndarray, n_max: int):
    """For n = 1..n_max: (start positions, counts) of the n-grams of alive documents that
    occur more than once in their document (n-grams never cross documents).

    Exact: n-gram ids are dense ranks of (id of the (n-1)-gram, id of the last word), and
    only starts whose (n-1)-grams at i and i+1 both repeat are candidates.
    """
    word_ids = batch.word_ids
    doc_end = batch.word_offsets[1:][batch.word_doc]
    n_words = len(word_ids)
    keys = batch.word_doc * (int(word_ids.max(initial=0)) + 1) + word_ids
    positions = np.flatnonzero(words_alive(batch, alive))
    ranks = np.zeros(0, dtype=np.int64)
    n_first = 1
    word_rank = np.zeros(n_words + 1, dtype=np.int64)
    for n in range(1, n_max + 1):
        if n > 1 and len(positions) == 0:
            yield positions, positions
            continue
        if n == 1:
            combined = keys[positions]
        else:
            repeated = np.zeros(n_words + 1, dtype=bool)
            repeated[positions] = True
            select = (positions + n <= doc_end[positions]) & repeated[positions + 1]
            positions = positions[select]
            combined = ranks[select] * n_first + word_rank[positions + n - 1]
        if len(positions) == 0:
            ranks = np.zeros(0, dtype=np.int64)
            yield positions, ranks
            continue
        _, inverse, counts = np.unique(combined, return_inverse=True, return_counts=True)
        counts = counts[inverse]
        keep = counts > 1
        positions, ranks, counts = positions[keep], inverse[keep], counts[keep]
        if n == 1:
            n_first = int(ranks.max(initial=0)) + 1
            word_rank[positions] = ranks
        yield positions, counts
