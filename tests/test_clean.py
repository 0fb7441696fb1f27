"""The clean pipeline: batch-vectorized filters and the partitioned, per-band dedup make exactly
the decisions of the straightforward one-document-at-a-time rules (kept below as the reference),
whatever the partitioning, and count every document once."""

from __future__ import annotations

import hashlib
import json
import random
import re
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from rensa import RMinHash, RMinHashLSH

from lmforge.data.clean_job import REJECTED_SAMPLES, CleanJob
from lmforge.data.job import Engine, run_data_job
from lmforge.data.quality.dedup import CanonicalTexts, lsh_bands, signatures
from lmforge.data.documents import METADATA_COLUMNS, make_document
from lmforge.data.documents import DocumentWriter
from lmforge.data.partitions import iter_dataset_batches, part_name, write_parts_manifest
from lmforge.data.quality.filters import build_filters
from lmforge.data.quality.text import TextBatch, normalize, normalize_batch
from lmforge.core.params import CleanParams

from conftest import make_texts

RAW = Path(__file__).resolve().parents[1] / "data/raw"

# --- The reference: one document at a time, plain Python (the original implementation). ---

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_SYMBOL = re.compile(r"[^\w\s]")
_LETTER = re.compile(r"[^\W\d_]")
_NON_WORD = re.compile(r"[\W_]+")


def ref_normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _SPACES.sub(" ", _CONTROL.sub("", text))
    text = re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+\n", "\n", text))
    return text.strip()


def _ngrams(words, n):
    return list(zip(*(words[i:] for i in range(n))))


def ref_filter_reason(p: CleanParams, text: str) -> tuple[str, str] | None:
    words = re.findall(r"\S+", text)
    if len(text) < p.min_chars:
        return "length", "too_few_chars"
    if len(text) > p.max_chars:
        return "length", "too_many_chars"
    if len(words) < p.min_words:
        return "length", "too_few_words"
    if len(words) > p.max_words:
        return "length", "too_many_words"
    if words:
        mean = sum(map(len, words)) / len(words)
        if mean < p.min_mean_word_length:
            return "mean_word_length", "mean_word_too_short"
        if mean > p.max_mean_word_length:
            return "mean_word_length", "mean_word_too_long"
    non_space = len(text) - text.count(" ") - text.count("\n")
    if non_space and len(_SYMBOL.findall(text)) / non_space > p.max_symbol_ratio:
        return "symbol_ratio", "too_many_symbols"
    if words and sum(1 for w in words if _LETTER.search(w)) / len(words) < p.min_alpha_word_ratio:
        return "alpha_words", "too_few_alphabetic_words"
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) >= 2:
        duplicated = sum(len(line) * n for line, n in Counter(lines).items() if n > 1)
        if duplicated / sum(map(len, lines)) > p.max_duplicate_line_char_fraction:
            return "duplicate_lines", "duplicate_lines"
    total = sum(map(len, words))
    for n, limit in sorted(p.max_top_ngram_char_fraction.items()):
        grams = _ngrams(words, n)
        if not grams:
            break
        gram, count = Counter(grams).most_common(1)[0]
        if count > 1 and count * sum(map(len, gram)) / total > limit:
            return "top_ngram", f"top_{n}gram"
    for n, limit in sorted(p.max_duplicate_ngram_char_fraction.items()):
        if len(words) < 2 * n:
            break
        grams = _ngrams(words, n)
        counts = Counter(grams)
        covered = bytearray(len(words))
        for i, gram in enumerate(grams):
            if counts[gram] > 1:
                covered[i : i + n] = b"\x01" * n
        if sum(len(w) for w, flag in zip(words, covered) if flag) / total > limit:
            return "duplicate_ngram", f"duplicate_{n}gram"
    return None


def ref_canonical(text: str) -> str:
    return _NON_WORD.sub(" ", text.casefold()).strip()


def ref_shingles(text: str, size: int) -> list[str]:
    words = ref_canonical(text).split()
    if len(words) <= size:
        return [" ".join(words)]
    return [" ".join(words[i : i + size]) for i in range(len(words) - size + 1)]


def ref_clean(p: CleanParams, docs: list[dict]) -> tuple[list[dict], dict, list[dict]]:
    """(kept documents, stats.to_dict(), rejected samples in order) as the reference sees them."""
    seen: set[bytes] = set()
    lsh = RMinHashLSH(threshold=p.minhash_threshold, num_perm=p.minhash_num_perm,
                      num_bands=lsh_bands(p.minhash_threshold, p.minhash_num_perm))
    kept_hashes: list[RMinHash] = []
    order = ["length", "mean_word_length", "symbol_ratio", "alpha_words", "duplicate_lines", "top_ngram",
             "duplicate_ngram"] + ["exact_dedup"] * p.exact_dedup + ["near_dedup"] * p.near_dedup
    steps = {name: {"kept": 0, "dropped": 0, "dropped_bytes": 0, "reasons": Counter()} for name in order}
    samples: dict[str, list[dict]] = {}
    kept, bytes_in, bytes_out, changed = [], 0, 0, 0
    for doc in docs:
        raw = doc["text"] or ""
        size = len(raw.encode("utf-8"))
        bytes_in += size
        if len(raw) > p.max_chars:  # before anything else: never normalized
            text, verdict = "", ("length", "too_many_chars")
        else:
            text = ref_normalize(raw)
            changed += text != raw
            verdict = ref_filter_reason(p, text)
        if verdict is None and p.exact_dedup:
            key = hashlib.blake2b(ref_canonical(text).encode(), digest_size=12).digest()
            verdict = ("exact_dedup", "exact_duplicate") if key in seen else None
            seen.add(key)
        if verdict is None and p.near_dedup:
            minhash = RMinHash(num_perm=p.minhash_num_perm, seed=p.minhash_seed)
            minhash.update(ref_shingles(text, p.minhash_shingle_size))
            if any(minhash.jaccard(kept_hashes[k]) >= p.minhash_threshold for k in lsh.query(minhash)):
                verdict = ("near_dedup", "near_duplicate")
            else:
                lsh.insert(len(kept_hashes), minhash)
                kept_hashes.append(minhash)
        passed = order if verdict is None else order[: order.index(verdict[0])]
        for name in passed:
            steps[name]["kept"] += 1
        if verdict is None:
            kept.append(dict(doc, text=text))
            bytes_out += len(text.encode("utf-8"))
            continue
        step, reason = verdict
        steps[step]["dropped"] += 1
        steps[step]["dropped_bytes"] += size
        steps[step]["reasons"][reason] += 1
        rows = samples.setdefault(reason, [])
        if len(rows) < p.rejected_samples_per_reason:
            rows.append({"reason": reason, "step": step, "id": doc["id"], "source": doc.get("source"),
                         "name": doc.get("name"), "chars": len(doc["text"]), "text": doc["text"][:2000]})
    stats = {
        "documents_in": len(docs), "bytes_in": bytes_in, "documents_out": len(kept), "bytes_out": bytes_out,
        "kept_document_fraction": len(kept) / len(docs) if docs else 0.0,
        "kept_byte_fraction": bytes_out / bytes_in if bytes_in else 0.0,
        "normalized_changed": changed,
        "steps": {name: dict(s, reasons=dict(sorted(s["reasons"].items()))) for name, s in steps.items()},
    }
    return kept, stats, [row for rows in samples.values() for row in rows]


# --- Corpora and parameter sets. ---

TRICKY = [
    "", " ", "a", "word", "e\u0301t\u00e9", "\u00bd \u216b \u0663\u0664 x\u00b2", "snake_case __init__", "\u4e2d\u6587\u5b57",
    "\U0001f600", "\r\n", "\r", "\x00", "\x07", "\x85", "\u200b", "\ufeff", "\x1c", "\x0b", "\x0c", "\t", "\u00a0",
    "\u2003", "\u3000", "\u1680", "\u2028", "\u2029", "\u202f", "\u205f", "\n", "\n\n\n", "  ", " \n", "---", "|", "#",
    "12345", "0x1f", "3.14", "the", "cat", "sat", "on", "mat", "\u0130", "\u00df", "\ufb01", "\u03a3", "\u1e9e",
]


def tricky_texts(n: int, seed: int) -> list[str]:
    """Random texts over words, Unicode oddities, controls, odd spaces and repeated blocks."""
    rng = random.Random(seed)
    vocabulary = make_texts(30, seed=seed)[0].split() + TRICKY
    texts = []
    for _ in range(n):
        parts = [rng.choice(vocabulary) + rng.choice([" ", " ", "\n", "", "\r\n", "\t"]) for _ in range(rng.randint(0, 60))]
        if rng.random() < 0.3:  # repeated lines and n-grams
            parts = parts * rng.randint(2, 4)
        texts.append("".join(parts))
    texts += ["".join(rng.choice(TRICKY) for _ in range(40)) for _ in range(n // 10)]
    texts += [text for text in texts[:50]]  # exact duplicates
    texts += [text.upper() + "!" for text in texts[50:80]]  # case/punctuation variants
    return texts


PARAMS = {
    "defaults": CleanParams(),
    "strict": CleanParams(
        min_chars=40, max_chars=1500, min_words=8, max_words=200, min_mean_word_length=3.0,
        max_mean_word_length=7.0, max_symbol_ratio=0.08, min_alpha_word_ratio=0.9,
        max_duplicate_line_char_fraction=0.1, max_top_ngram_char_fraction={1: 0.12, 2: 0.08, 4: 0.05},
        max_duplicate_ngram_char_fraction={5: 0.1, 7: 0.05, 10: 0.02}, minhash_threshold=0.5,
        minhash_num_perm=64, minhash_shingle_size=3, rejected_samples_per_reason=2, batch_size=37,
    ),
    "loose": CleanParams(
        min_chars=0, min_words=0, min_mean_word_length=0, max_symbol_ratio=1, min_alpha_word_ratio=0,
        max_duplicate_line_char_fraction=1, max_top_ngram_char_fraction={3: 0.6},
        max_duplicate_ngram_char_fraction={6: 0.9}, exact_dedup=False, minhash_threshold=0.95, batch_size=500,
    ),
}


def _docs(texts: list[str]) -> list[dict]:
    return [{"id": f"d{i}", "text": text, "source": "test", "name": f"n{i}"} for i, text in enumerate(texts)]


def run_clean(params: CleanParams, raw: Path, out: Path, staging: Path, engine: Engine = Engine()) -> dict:
    """The clean job through the data-job driver, its tasks in this process unless `engine` has a
    client (the same code as on the Dask engine): its stats and rejected samples, as written."""
    stats = run_data_job(CleanJob(params, raw, out, staging), engine)
    # Lines end at "\n" only: a sample's text may hold U+2028 or U+0085, which splitlines() also splits at.
    samples = [json.loads(line) for line in (out / REJECTED_SAMPLES).read_text(encoding="utf-8").split("\n") if line]
    return {"stats": stats, "samples": samples}


def write_raw(directory: Path, docs: list[dict], parts: int) -> None:
    """`docs` as a partitioned raw dataset of `parts` consecutive slices (ingest's layout)."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(docs), parts + 1).astype(int)
    entries = []
    for index in range(parts):
        with DocumentWriter(directory / part_name(index)) as writer:
            # Every metadata column the documents carry (the real corpus has module, package, ...).
            writer.write([make_document(doc["text"], doc.get("source") or "test",
                                        **{column: doc.get(column) for column in METADATA_COLUMNS})
                          | {"id": doc["id"]} for doc in docs[bounds[index] : bounds[index + 1]]])
        entries.append({"name": part_name(index), "documents": writer.documents, "bytes": writer.bytes})
    write_parts_manifest(directory, entries)


EXTRAS = ("seconds", "mb_per_s", "partitions", "dedup_seconds", "workers")


def _run(params: CleanParams, docs: list[dict], parts: int = 3) -> tuple[list[dict], dict, list[dict]]:
    """(kept documents, stats without the run's timings and per-partition lines, samples)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_raw(root / "raw", docs, parts)
        result = run_clean(params, root / "raw", root / "clean", root / "staging")
        kept = [doc for batch in iter_dataset_batches(root / "clean", 1000, "clean") for doc in batch]
    columns = {key for doc in docs for key in doc}
    kept = [{key: value for key, value in doc.items() if key in columns} for doc in kept]
    stats = {key: value for key, value in result["stats"].items() if key not in EXTRAS}
    return kept, stats, result["samples"]


@pytest.fixture(scope="module")
def real_docs() -> list[dict]:
    if (RAW / "manifest.json").exists():
        return [doc for batch in iter_dataset_batches(RAW, 10_000, "ingest") for doc in batch]
    return _docs(make_texts(3000, seed=7) + tricky_texts(1000, seed=8))


# --- Equivalence with the reference. ---

@pytest.mark.parametrize("name", ["defaults", "strict"])
def test_real_corpus_gets_the_reference_decisions_stats_and_samples(real_docs, name):
    params = PARAMS[name]
    assert _run(params, real_docs) == ref_clean(params, real_docs)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_edge_case_corpus_gets_the_reference_decisions_stats_and_samples(name):
    docs = _docs(tricky_texts(600, seed=len(name)))
    assert _run(PARAMS[name], docs) == ref_clean(PARAMS[name], docs)


def test_normalize_batch_equals_per_document_normalize():
    texts = tricky_texts(800, seed=3) + TRICKY + ["".join(TRICKY)]
    batch = normalize_batch(TextBatch.from_strings(texts).texts).to_pylist()
    assert batch == [ref_normalize(text) for text in texts] == [normalize(text) for text in texts]


def test_words_are_python_whitespace_split_tokens():
    texts = [normalize(text) for text in tricky_texts(300, seed=4)] + TRICKY
    batch = TextBatch.from_strings(texts)
    words = [texts[d][s : s + n] for d, s, n in zip(batch.word_doc, batch.word_starts - batch.char_offsets[batch.word_doc], batch.word_lengths)]
    assert words == [word for text in texts for word in text.split()]


def test_canonical_texts_and_signatures_equal_the_per_document_ones():
    texts = [normalize(text) for text in tricky_texts(300, seed=5)] + TRICKY
    canonical = CanonicalTexts(texts)
    assert [canonical[i] for i in range(len(texts))] == [ref_canonical(text) for text in texts]
    for size in (1, 3, 5):
        expected = []
        for text in texts:
            minhash = RMinHash(num_perm=64, seed=3)
            minhash.update(ref_shingles(text, size))
            expected.append(minhash.digest())
        assert signatures(canonical, 64, size, 3).tolist() == expected


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_each_filter_alone_matches_the_reference_rule(name):
    params = PARAMS[name]
    texts = [normalize(text) for text in tricky_texts(400, seed=6)]
    batch = TextBatch.from_strings(texts)
    verdicts = {}
    alive = np.ones(len(texts), dtype=bool)
    for step in build_filters(params):
        codes = step.reject_codes(batch, alive)
        for doc in np.flatnonzero(alive & (codes > 0)):
            verdicts[int(doc)] = (step.name, step.reasons[codes[doc] - 1])
        alive &= codes == 0
    assert verdicts == {i: v for i, text in enumerate(texts) if (v := ref_filter_reason(params, text))}


# --- Counting. ---

def test_stats_count_every_document_exactly_once():
    docs = _docs(tricky_texts(400, seed=9))
    _, stats, _ = _run(PARAMS["strict"], docs)
    dropped = sum(step["dropped"] for step in stats["steps"].values())
    assert stats["documents_in"] == len(docs) == stats["documents_out"] + dropped


def test_rejected_samples_are_bounded_per_reason():
    _, stats, samples = _run(PARAMS["strict"], _docs(tricky_texts(400, seed=10)))
    per_reason = Counter(row["reason"] for row in samples)
    assert per_reason and max(per_reason.values()) <= PARAMS["strict"].rejected_samples_per_reason
    assert set(per_reason) == {r for step in stats["steps"].values() for r in step["reasons"]}


@pytest.mark.parametrize("parts", [1, 7])
def test_the_partitioning_changes_nothing(parts):
    docs = _docs(tricky_texts(300, seed=11))
    assert _run(PARAMS["strict"], docs, parts=parts) == _run(PARAMS["strict"], docs, parts=3)


def test_exact_duplicates_keep_the_first_and_drop_case_and_punctuation_variants():
    text = "The river carries small stones down to the sea every spring."
    kept, stats, _ = _run(CleanParams(), _docs([text, text.upper(), text.replace(".", "!!"), "  " + text]))
    assert [doc["id"] for doc in kept] == ["d0"]
    assert stats["steps"]["exact_dedup"]["dropped"] == 3


def test_near_duplicates_with_one_word_changed_are_dropped_and_distinct_documents_kept():
    base = make_texts(1, seed=1, words_per_doc=(400, 400))[0]
    words = base.split()
    variant = " ".join(words[:200] + ["zebra"] + words[201:])
    other = make_texts(2, seed=2, words_per_doc=(400, 400))[1]
    kept, stats, _ = _run(CleanParams(), _docs([base, variant, other]))
    assert [doc["id"] for doc in kept] == ["d0", "d2"]
    assert stats["steps"]["near_dedup"]["reasons"] == {"near_duplicate": 1}


def test_near_duplicates_within_one_batch_and_across_batches_are_both_dropped():
    base = make_texts(1, seed=3, words_per_doc=(400, 400))[0]
    variant = base.replace("Document 0.", "Document zero.")
    params = CleanParams(batch_size=2)
    kept, _, _ = _run(params, _docs([base, variant, "Unrelated words about a quiet harbour at dawn.", variant + " ok"]))
    assert [doc["id"] for doc in kept] == ["d0", "d2"]


def test_near_and_exact_duplicates_in_other_partitions_drop_the_later_copy():
    base = make_texts(1, seed=5, words_per_doc=(200, 200))[0]
    words = base.split()
    near = " ".join(words[:100] + ["zebra"] + words[101:])
    exact = base.upper() + "!"
    fillers = make_texts(9, seed=6, words_per_doc=(60, 60))
    docs = _docs([fillers[0], base, fillers[1], fillers[2], near, fillers[3], fillers[4], exact, fillers[5]])
    kept, stats, samples = _run(CleanParams(), docs, parts=3)  # base in part 0, near in part 1, exact in part 2
    assert [doc["id"] for doc in kept] == ["d0", "d1", "d2", "d3", "d5", "d6", "d8"]
    assert stats["steps"]["exact_dedup"]["reasons"] == {"exact_duplicate": 1}
    assert stats["steps"]["near_dedup"]["reasons"] == {"near_duplicate": 1}
    assert [(row["id"], row["reason"]) for row in samples] == [("d4", "near_duplicate"), ("d7", "exact_duplicate")]


# --- Memory: bounded by clean.max_chars, not by the longest document. ---

PEAK_MEMORY_SCRIPT = """\
import json, re, sys
from pathlib import Path
from lmforge.data.clean_job import REJECTED_SAMPLES, CleanJob
from lmforge.data.job import Engine, run_data_job
from lmforge.core.params import CleanParams

def status_mb(key):
    return int(re.search(rf"^{key}:\\s+(\\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024

root = Path(sys.argv[1])
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current size
before = status_mb("VmRSS")
stats = run_data_job(CleanJob(CleanParams(), root / "raw", root / "clean", root / "staging"), Engine())
samples = [json.loads(line) for line in (root / "clean" / REJECTED_SAMPLES).read_text().split("\\n") if line]
print(json.dumps({"grown_mb": status_mb("VmHWM") - before, "length": stats["steps"]["length"],
                  "samples": [(row["reason"], row["chars"], len(row["text"])) for row in samples]}))
"""


def test_a_huge_document_is_dropped_by_length_before_it_costs_memory(tmp_path):
    """One 30 MB document among short ones, max_chars at its default (200,000): dropped and counted
    as too_many_chars before normalization and the filters. The clean's peak memory grew by 850 MB
    before (27 times the document); now by what reading it from Parquet costs (about 4 times)."""
    import json
    import subprocess
    import sys

    huge_chars = 30_000_000
    sentence = "The quick brown fox jumps over the lazy dog near the river stone.\n"
    huge = (sentence * (huge_chars // len(sentence) + 1))[:huge_chars]
    texts = make_texts(40, seed=11)
    write_raw(tmp_path / "raw", _docs(texts[:20] + [huge] + texts[20:] + texts[:1]), parts=1)  # and a duplicate
    del huge
    done = subprocess.run([sys.executable, "-c", PEAK_MEMORY_SCRIPT, str(tmp_path)], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["length"]["dropped"] == 1 and result["length"]["reasons"] == {"too_many_chars": 1}
    assert result["length"]["dropped_bytes"] == huge_chars
    assert ("too_many_chars", huge_chars, 2000) in [tuple(row) for row in result["samples"]]
    assert result["grown_mb"] < 400, result["grown_mb"]  # main: 850 MB; now about 210 (70 of them without it)


def test_max_chars_applies_to_the_text_as_ingested_before_normalization():
    """The length check that comes first sees the raw text: padding that normalization would
    remove still counts (so no document over max_chars is ever normalized)."""
    words = "The river runs over the stone and the quick fox reads a long file."
    params = CleanParams(max_chars=100, exact_dedup=False, near_dedup=False)
    kept, stats, _ = _run(params, _docs([words, words + " " * 100]), parts=1)
    assert [doc["id"] for doc in kept] == ["d0"]
    assert stats["steps"]["length"]["reasons"] == {"too_many_chars": 1} and stats["normalized_changed"] == 0
