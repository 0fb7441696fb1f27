"""Each quality filter's one decision on crafted documents, and what normalization does."""

from __future__ import annotations

import numpy as np

from lmforge.data.dedup import ExactDedup, NearDedup
from lmforge.data.filters import (
    AlphaWordRatioFilter,
    DuplicateLineFilter,
    DuplicateNgramFilter,
    LengthFilter,
    MeanWordLengthFilter,
    SymbolRatioFilter,
    TopNgramFilter,
    build_filters,
)
from lmforge.data.text import TextBatch, normalize
from lmforge.params import CleanParams

PARAGRAPH = (
    "The river carries small stones from the mountains down to the sea. Every spring the water "
    "rises and the banks change their shape, so the village moves its bridge a little further "
    "upstream. Children learn to read the current before they learn to swim."
)


def _reasons(text: str, params: CleanParams | None = None) -> list[str]:
    """Every filter's reason for `text` (each run alone), None-free."""
    return [reason for step in build_filters(params or CleanParams()) if (reason := step.reject_reason(text))]


def test_a_normal_english_paragraph_passes_every_filter():
    assert _reasons(PARAGRAPH) == []


def test_length_filter_drops_too_short_and_too_long_texts():
    step = LengthFilter(min_chars=16, max_chars=100, min_words=3, max_words=10)
    assert step.reject_reason("tiny") == "too_few_chars"
    assert step.reject_reason("x" * 101) == "too_many_chars"
    assert step.reject_reason("supercalifragilistic word") == "too_few_words"
    assert step.reject_reason("a b c d e f g h i j k l") == "too_many_words"
    assert step.reject_reason("three short words here") is None


def test_mean_word_length_filter_drops_long_tokens_and_letter_soup():
    step = MeanWordLengthFilter(minimum=2.0, maximum=15.0)
    assert step.reject_reason("aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQ= aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQ=") == "mean_word_too_long"
    assert step.reject_reason("a b c d e f g h") == "mean_word_too_short"
    assert step.reject_reason(PARAGRAPH) is None
    assert step.reject_reason("") is None  # empty documents are the length filter's


def test_symbol_ratio_filter_drops_markup_tables():
    step = SymbolRatioFilter(maximum=0.35)
    assert step.reject_reason("+---+---+\n| a | b |\n+---+---+") == "too_many_symbols"
    assert step.reject_reason(PARAGRAPH) is None


def test_alpha_word_filter_drops_number_dumps():
    step = AlphaWordRatioFilter(minimum=0.5)
    assert step.reject_reason("1 2 3 4 5 6 7 8 9 10 11 12 0x1f 3.14 1e9 total") == "too_few_alphabetic_words"
    assert step.reject_reason("Version 3 of the parser accepts 12 new tokens") is None


def test_duplicate_line_filter_drops_repeated_lines_and_ignores_blank_ones():
    step = DuplicateLineFilter(maximum=0.5)
    assert step.reject_reason("click here to subscribe\n" * 5 + "the end") == "duplicate_lines"
    assert step.reject_reason("first line\n\n\nsecond line\n\nthird line") is None


def test_top_ngram_filter_drops_a_dominant_phrase():
    step = TopNgramFilter({2: 0.3, 3: 0.3, 4: 0.3})
    assert step.reject_reason("buy now " * 10 + "please") == "top_2gram"
    assert step.reject_reason(PARAGRAPH) is None


def test_duplicate_ngram_filter_drops_repeated_passages():
    step = DuplicateNgramFilter({5: 0.5, 6: 0.45, 10: 0.3})
    passage = "the quick brown fox jumps over the lazy dog today"
    assert step.reject_reason(f"{passage} and then {passage} again") == "duplicate_5gram"
    assert step.reject_reason(PARAGRAPH) is None


def test_smallest_failing_n_is_the_reason():
    assert TopNgramFilter({4: 0.1, 2: 0.1}).reject_reason("a b c d " * 6) == "top_2gram"


def test_filters_only_judge_alive_documents():
    batch = TextBatch.from_strings(["tiny", "tiny", PARAGRAPH])
    codes = LengthFilter(16, 1000, 3, 1000).reject_codes(batch, np.array([True, False, True]))
    assert codes.tolist() == [1, 0, 0]


def test_normalize_composes_nfc():
    assert normalize("Lo\u0308wis") == "L\u00f6wis"


def test_normalize_removes_control_and_zero_width_characters():
    assert normalize("a\x00b\x07c\u200bd\ufeffe\x85f") == "abcdef"


def test_normalize_collapses_spaces_trailing_spaces_and_blank_lines():
    assert normalize("  a \t\u00a0 b  \r\nc\r\r\r\r d \n\n\n\n e\u3000 ") == "a b\nc\n\n d\n\n e"


def test_exact_dedup_folds_case_and_punctuation_and_keeps_the_first():
    step = ExactDedup()
    assert step.reject_reason("Hello, World!") is None
    assert step.reject_reason("hello world") == "exact_duplicate"
    assert step.reject_reason("HELLO -- world...") == "exact_duplicate"
    assert step.reject_reason("hello there world") is None


def test_near_dedup_drops_a_one_word_edit_but_keeps_distinct_text():
    words = (PARAGRAPH + " " + PARAGRAPH.upper().replace("THE", "one")).split() * 3
    step = NearDedup(threshold=0.8, num_perm=128, shingle_size=5, seed=42)
    assert step.reject_reason(" ".join(words)) is None
    assert step.reject_reason(" ".join(words[:40] + ["zebra"] + words[41:])) == "near_duplicate"
    assert step.reject_reason("An unrelated note about harbour lights, tides and gulls at dawn.") is None
