"""Quality filters for the clean stage, datatrove-style: each a small class with one
decision, `reject_reason(text) -> str | None`, composed from params by `build_filters`.

Thresholds follow Gopher (Rae et al. 2021) rules, loosened so that docstrings and
language-reference prose (which quote code) pass; see README "clean" for the defaults.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from lmforge.params import CleanParams

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")
_WORD = re.compile(r"\S+")
_SYMBOL = re.compile(r"[^\w\s]")
_LETTER = re.compile(r"[^\W\d_]")


def normalize(text: str) -> str:
    """NFC, control characters removed, runs of spaces collapsed, at most one blank line.

    Newlines are kept: line structure is what the repetition filters (and code in
    docstrings) rely on.
    """
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


class Filter:
    """One decision about a document's (normalized) text."""

    name: str = "filter"

    def reject_reason(self, text: str, words: list[str]) -> str | None:
        """None to keep the document, else the reason it is dropped."""
        raise NotImplementedError


@dataclass
class LengthFilter(Filter):
    min_chars: int
    max_chars: int
    min_words: int
    max_words: int
    name: str = "length"

    def reject_reason(self, text: str, words: list[str]) -> str | None:
        if len(text) < self.min_chars:
            return "too_few_chars"
        if len(text) > self.max_chars:
            return "too_many_chars"
        if len(words) < self.min_words:
            return "too_few_words"
        if len(words) > self.max_words:
            return "too_many_words"
        return None


@dataclass
class MeanWordLengthFilter(Filter):
    minimum: float
    maximum: float
    name: str = "mean_word_length"

    def reject_reason(self, text: str, words: list[str]) -> str | None:
        if not words:
            return None  # the length filter owns empty documents
        mean = sum(map(len, words)) / len(words)
        if mean < self.minimum:
            return "mean_word_too_short"
        if mean > self.maximum:
            return "mean_word_too_long"
        return None


@dataclass
class SymbolRatioFilter(Filter):
    """Drops documents dominated by punctuation/symbols (tables of markup, ASCII art)."""

    maximum: float
    name: str = "symbol_ratio"

    def reject_reason(self, text: str, words: list[str]) -> str | None:
        non_space = len(text) - text.count(" ") - text.count("\n")
        if non_space and len(_SYMBOL.findall(text)) / non_space > self.maximum:
            return "too_many_symbols"
        return None


@dataclass
class AlphaWordRatioFilter(Filter):
    """Gopher: most words must contain a letter (drops number dumps and hex blobs)."""

    minimum: float
    name: str = "alpha_words"

    def reject_reason(self, text: str, words: list[str]) -> str | None:
        if words and sum(1 for w in words if _LETTER.search(w)) / len(words) < self.minimum:
            return "too_few_alphabetic_words"
        return None


@dataclass
class DuplicateLineFilter(Filter):
    """Gopher: fraction of characters in lines that occur more than once."""

    maximum: float
    name: str = "duplicate_lines"

    def reject_reason(self, text: str, words: list[str]) -> str | None:
        lines = [line for line in text.split("\n") if line.strip()]
        if len(lines) < 2:
            return None
        counts = Counter(lines)
        duplicated = sum(len(line) * n for line, n in counts.items() if n > 1)
        if duplicated / sum(map(len, lines)) > self.maximum:
            return "duplicate_lines"
        return None


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(words[i:] for i in range(n))))


@dataclass
class TopNgramFilter(Filter):
    """Gopher: characters covered by the most frequent n-gram, for small n."""

    max_fraction: dict[int, float]
    name: str = "top_ngram"

    def reject_reason(self, text: str, words: list[str]) -> str | None:
        total = sum(map(len, words))
        for n, limit in sorted(self.max_fraction.items()):
            grams = _ngrams(words, n)
            if not grams:
                break
            gram, count = Counter(grams).most_common(1)[0]
            if count > 1 and count * sum(map(len, gram)) / total > limit:
                return f"top_{n}gram"
        return None


@dataclass
class DuplicateNgramFilter(Filter):
    """Gopher: characters covered by n-grams that occur more than once, for large n."""

    max_fraction: dict[int, float]
    name: str = "duplicate_ngram"

    def reject_reason(self, text: str, words: list[str]) -> str | None:
        total = sum(map(len, words))
        for n, limit in sorted(self.max_fraction.items()):
            if len(words) < 2 * n:
                break  # no n-gram can repeat without overlap; larger n cannot either
            grams = _ngrams(words, n)
            counts = Counter(grams)
            if len(counts) == len(grams):
                continue
            covered = bytearray(len(words))
            for i, gram in enumerate(grams):
                if counts[gram] > 1:
                    covered[i : i + n] = b"\x01" * n
            chars = sum(len(w) for w, flag in zip(words, covered) if flag)
            if chars / total > limit:
                return f"duplicate_{n}gram"
        return None


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


def split_words(text: str) -> list[str]:
    return _WORD.findall(text)
