"""Each quality filter's one decision on crafted documents, and what normalization does."""

from __future__ import annotations

import numpy as np

from lmforge.data.quality.dedup import (CanonicalTexts, band_buckets, band_keys, exact_duplicates, exact_keys, lsh_bands,
                                near_duplicates, signatures, verified_pairs)
from lmforge.data.quality.filters import (
    AlphaWordRatioFilter,
    DuplicateLineFilter,
    DuplicateNgramFilter,
    LengthFilter,
    MeanWordLengthFilter,
    SymbolRatioFilter,
    TopNgramFilter,
    build_filters,
)
from lmforge.data.quality.text import TextBatch, normalize
from lmforge.core.params import CleanParams

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
    texts = ["Hello, World!", "hello world", "HELLO -- world...", "hello there world"]
    high, low = exact_keys(CanonicalTexts(texts))
    assert exact_duplicates(high, low, np.arange(len(texts))).tolist() == [1, 2]


def _near_dropped(texts: list[str], threshold: float = 0.8, num_perm: int = 128) -> list[int]:
    """Which of `texts` (gids 0..n-1) near dedup drops: every band, then the walk in order."""
    sigs = signatures(CanonicalTexts(texts), num_perm, 5, 42)
    keys, gids = band_keys(sigs, lsh_bands(threshold, num_perm)), np.arange(len(texts))
    pairs = [verified_pairs(band_buckets(keys[:, band], gids, None), lambda bucket: sigs[bucket], threshold)
             for band in range(keys.shape[1])]
    return near_duplicates(np.concatenate(pairs)).tolist()


def test_near_dedup_drops_a_one_word_edit_but_keeps_distinct_text():
    words = (PARAGRAPH + " " + PARAGRAPH.upper().replace("THE", "one")).split() * 3
    texts = [" ".join(words), " ".join(words[:40] + ["zebra"] + words[41:]),
             "An unrelated note about harbour lights, tides and gulls at dawn."]
    assert _near_dropped(texts) == [1]


def test_near_dedup_drops_a_document_only_for_a_kept_match():
    # b matches a, c matches b but not a: b goes, so c stays (the one-pass rule, not clusters).
    words = [f"w{i}" for i in range(200)]
    b_words = words[:50] + ["x"] + words[51:]
    a, b, c = " ".join(words), " ".join(b_words), " ".join(b_words[:150] + ["y"] + b_words[151:])
    sigs = signatures(CanonicalTexts([a, b, c]), 1024, 5, 42)
    similar = [(sigs[i] == sigs[j]).mean() >= 0.93 for i, j in ((0, 1), (1, 2), (0, 2))]
    assert similar == [True, True, False]
    assert _near_dropped([a, b, c], threshold=0.93, num_perm=1024) == [1]


def test_lsh_bands_find_pairs_halfway_from_the_threshold_to_identity_99_percent_of_the_time():
    assert lsh_bands(0.8, 128) == 16  # 16 bands of 8 rows: P(Jaccard 0.9 shares a band) = 0.9999


def test_near_dedup_finds_a_one_word_edit_of_a_120_word_document_at_least_99_percent_of_the_time():
    rng = np.random.default_rng(0)
    vocabulary = [f"w{i}x" for i in range(5000)]
    texts = []
    for _ in range(400):
        doc = list(rng.choice(vocabulary, 120))
        edit = list(doc)
        edit[rng.integers(120)] = "edited"
        texts += [" ".join(doc), " ".join(edit)]
    dropped = np.array(_near_dropped(texts))
    assert np.all(dropped % 2 == 1)  # only edits, never a distinct document
    assert len(dropped) / 400 >= 0.99
