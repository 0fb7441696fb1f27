"""Quality filters for the clean stage, datatrove-style: each a small class with one
decision, composed from params by `build_filters`, run over a whole batch at once.

A filter sees a `TextBatch` (lmforge.data.quality.text: the normalized texts of a batch with their
numpy views) and an `alive` mask; `reject_codes` returns one code per document: 0 keeps it,
k > 0 drops it for `reasons[k - 1]`. `reject_reason(text)` is the same decision for one text.

Character classes come from Python's own `re` (see lmforge.data.quality.text), so the decisions are
exactly those of the per-document rules written in the docstrings.
Thresholds follow Gopher (Rae et al. 2021) rules, loosened so that docstrings and
language-reference prose (which quote code) pass; see README "clean" for the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lmforge.data.quality.text import LETTER, WHITESPACE, WORD_CHAR, TextBatch, segment_sums
from lmforge.core.params import CleanParams


class Filter:
    """One decision about each document of a batch."""

    name: str = "filter"
    reasons: tuple[str, ...] = ()

    def reject_codes(self, batch: TextBatch, alive: np.ndarray) -> np.ndarray:
        """Per document: 0 to keep it, k to drop it for `reasons[k - 1]` (0 where not alive)."""
        raise NotImplementedError

    def reject_reason(self, text: str) -> str | None:
        """The decision for one normalized text: None to keep it, else the reason."""
        code = int(self.reject_codes(TextBatch.from_strings([text]), np.ones(1, dtype=bool))[0])
        return self.reasons[code - 1] if code else None


def _first_reason(conditions: list[np.ndarray], alive: np.ndarray) -> np.ndarray:
    codes = np.zeros(len(alive), dtype=np.int16)
    for code, condition in reversed(list(enumerate(conditions, start=1))):
        codes[condition] = code
    codes[~alive] = 0
    return codes


@dataclass
class LengthFilter(Filter):
    """Characters and words within bounds (checked in that order); a text over max_chars before
    normalization is dropped as too_many_chars whatever normalization would make of it."""

    min_chars: int
    max_chars: int
    min_words: int
    max_words: int
    name: str = "length"
    reasons: ClassVar[tuple[str, ...]] = ("too_few_chars", "too_many_chars", "too_few_words", "too_many_words")

    def too_long(self, raw_chars: np.ndarray) -> np.ndarray:
        """Documents over max_chars before normalization (which only shortens a text, but for NFC's
        rare expansions, which reject_codes still catches): the cleaner drops them first, unread."""
        return raw_chars > self.max_chars

    def reject_codes(self, batch: TextBatch, alive: np.ndarray) -> np.ndarray:
        chars, words = batch.char_counts, batch.word_counts
        return _first_reason(
            [chars < self.min_chars, chars > self.max_chars, words < self.min_words, words > self.max_words], alive
        )


@dataclass
class MeanWordLengthFilter(Filter):
    """Mean word length (characters) within bounds; empty documents are the length filter's."""

    minimum: float
    maximum: float
    name: str = "mean_word_length"
    reasons: ClassVar[tuple[str, ...]] = ("mean_word_too_short", "mean_word_too_long")

    def reject_codes(self, batch: TextBatch, alive: np.ndarray) -> np.ndarray:
        counts = batch.word_counts
        has_words = counts > 0
        mean = batch.word_chars / np.maximum(counts, 1)
        return _first_reason([has_words & (mean < self.minimum), has_words & (mean > self.maximum)], alive)


@dataclass
class SymbolRatioFilter(Filter):
    """Drops documents dominated by punctuation/symbols (tables of markup, ASCII art):
    characters matching `[^\\w\\s]` over characters that are neither " " nor "\\n"."""

    maximum: float
    name: str = "symbol_ratio"
    reasons: ClassVar[tuple[str, ...]] = ("too_many_symbols",)

    def reject_codes(self, batch: TextBatch, alive: np.ndarray) -> np.ndarray:
        cps = batch.codepoints
        symbols = batch.count_chars((batch.flags & (WHITESPACE | WORD_CHAR)) == 0)
        non_space = batch.char_counts - batch.count_chars((cps == 0x20) | (cps == 0x0A))
        ratio = symbols / np.maximum(non_space, 1)
        return _first_reason([(non_space > 0) & (ratio > self.maximum)], alive)


@dataclass
class AlphaWordRatioFilter(Filter):
    """Gopher: most words must contain a letter (drops number dumps and hex blobs)."""

    minimum: float
    name: str = "alpha_words"
    reasons: ClassVar[tuple[str, ...]] = ("too_few_alphabetic_words",)

    def reject_codes(self, batch: TextBatch, alive: np.ndarray) -> np.ndarray:
        starts = batch.word_starts
        # Letters are most characters: count the others (fewer to search).
        no_letter = (batch.flags & LETTER) == 0
        has_letter = batch.count_in_spans(no_letter, starts, starts + batch.word_lengths) < batch.word_lengths
        counts = batch.word_counts
        ratio = segment_sums(has_letter, batch.word_offsets) / np.maximum(counts, 1)
        return _first_reason([(counts > 0) & (ratio < self.minimum)], alive)


@dataclass
class DuplicateLineFilter(Filter):
    """Gopher: fraction of characters in non-blank lines that are in lines occurring more
    than once in the document (documents with fewer than two such lines pass)."""

    maximum: float
    name: str = "duplicate_lines"
    reasons: ClassVar[tuple[str, ...]] = ("duplicate_lines",)

    def reject_codes(self, batch: TextBatch, alive: np.ndarray) -> np.ndarray:
        is_newline = batch.codepoints == 0x0A
        # Only alive documents that hold a newline can have two lines.
        candidates = alive & (batch.count_chars(is_newline) > 0)
        if not candidates.any():
            return np.zeros(batch.size, dtype=np.int16)
        newlines = np.flatnonzero(is_newline & np.repeat(candidates, batch.char_counts))
        offsets = batch.char_offsets
        starts = np.sort(np.concatenate([offsets[:-1][candidates], newlines + 1]))
        ends = np.sort(np.concatenate([newlines, offsets[1:][candidates]]))
        keep = batch.count_in_spans((batch.flags & WHITESPACE) > 0, starts, ends) < ends - starts
        starts, ends = starts[keep], ends[keep]
        docs = np.searchsorted(offsets, starts, side="right") - 1
        line_ids = batch.substring_ids(starts, ends)
        _, inverse, counts = np.unique(docs * (int(line_ids.max(initial=0)) + 1) + line_ids,
                                       return_inverse=True, return_counts=True)
        lengths = ends - starts
        line_offsets = np.searchsorted(docs, np.arange(batch.size + 1))
        total = segment_sums(lengths, line_offsets)
        duplicated = segment_sums(lengths * (counts[inverse] > 1), line_offsets)
        n_lines = np.diff(line_offsets)
        ratio = duplicated / np.maximum(total, 1)
        return _first_reason([(n_lines >= 2) & (ratio > self.maximum)], alive)


@dataclass
class NgramFilter(Filter):
    """Base of the n-gram repetition filters: one limit and one reason per n (`<prefix>_<n>gram`),
    reason codes in increasing n."""

    max_fraction: dict[int, float]
    prefix: ClassVar[str] = ""

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(f"{self.prefix}_{n}gram" for n in sorted(self.max_fraction))

    def _start(self, batch: TextBatch, alive: np.ndarray) -> tuple[np.ndarray, dict[int, float], dict[int, int]]:
        """(codes all 0, the limits, n -> reason code); no limit or no live document: no limits."""
        codes = np.zeros(batch.size, dtype=np.int16)
        limits = dict(self.max_fraction) if alive.any() else {}
        return codes, limits, {n: code for code, n in enumerate(sorted(limits), start=1)}


@dataclass
class TopNgramFilter(NgramFilter):
    """Gopher: characters covered by the most frequent word n-gram, for small n: count x
    characters of the n-gram over the characters of all words. Ties go to the n-gram seen
    first; the smallest failing n is the reason."""

    name: str = "top_ngram"
    prefix: ClassVar[str] = "top"

    def reject_codes(self, batch: TextBatch, alive: np.ndarray) -> np.ndarray:
        codes, limits, code_of = self._start(batch, alive)
        if not limits:
            return codes
        char_ends = np.zeros(len(batch.word_lengths) + 1, dtype=np.int64)
        np.cumsum(batch.word_lengths, out=char_ends[1:])
        for n, (positions, counts) in enumerate(batch.repeated_ngrams(alive, max(limits)), start=1):
            if n not in limits or len(positions) == 0:
                continue
            docs = batch.word_doc[positions]
            first = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
            top = np.maximum.reduceat(counts, first)
            group = np.cumsum(np.r_[False, docs[1:] != docs[:-1]])
            at_top = np.flatnonzero(counts == top[group])
            chosen = at_top[np.r_[True, group[at_top][1:] != group[at_top][:-1]]]
            gram_chars = char_ends[positions[chosen] + n] - char_ends[positions[chosen]]
            chosen_docs = docs[chosen]
            fraction = top * gram_chars / batch.word_chars[chosen_docs]
            failing = chosen_docs[(fraction > limits[n]) & (codes[chosen_docs] == 0)]
            codes[failing] = code_of[n]
        return codes


@dataclass
class DuplicateNgramFilter(NgramFilter):
    """Gopher: characters covered by word n-grams occurring more than once, for large n,
    over the characters of all words. n is checked only while the document has at least
    2n words; the smallest failing n is the reason."""

    name: str = "duplicate_ngram"
    prefix: ClassVar[str] = "duplicate"

    def reject_codes(self, batch: TextBatch, alive: np.ndarray) -> np.ndarray:
        codes, limits, code_of = self._start(batch, alive)
        if not limits:
            return codes
        n_words = len(batch.word_lengths)
        # Checked from the smallest n; a document with fewer than 2n words stops there.
        alive = alive & (batch.word_counts >= 2 * min(limits))
        for n, (positions, counts) in enumerate(batch.repeated_ngrams(alive, max(limits)), start=1):
            if n not in limits:
                continue
            active = alive & (codes == 0) & (batch.word_counts >= 2 * n)
            positions = positions[active[batch.word_doc[positions]]]
            if len(positions) == 0:
                continue
            edges = np.bincount(positions, minlength=n_words + 1) - np.bincount(positions + n, minlength=n_words + 1)
            covered = np.cumsum(edges[:n_words]) > 0
            chars = segment_sums(batch.word_lengths * covered, batch.word_offsets)
            fraction = chars / np.maximum(batch.word_chars, 1)
            codes[active & (fraction > limits[n])] = code_of[n]
        return codes


def build_filters(params: CleanParams) -> list[Filter]:
    """The quality filters in the order they run: cheapest first."""
    return [
        LengthFilter(params.min_chars, params.max_chars, params.min_words, params.max_words),
        MeanWordLengthFilter(params.min_mean_word_length, params.max_mean_word_length),
        SymbolRatioFilter(params.max_symbol_ratio),
        AlphaWordRatioFilter(params.min_alpha_word_ratio),
        DuplicateLineFilter(params.max_duplicate_line_char_fraction),
        TopNgramFilter(dict(params.max_top_ngram_char_fraction)),
        DuplicateNgramFilter(dict(params.max_duplicate_ngram_char_fraction)),
    ]
