"""The clean stage's per-document work and its bookkeeping: normalize and run each quality
filter over a batch (`Cleaner`), counting for every step what it kept and dropped (documents,
bytes, reasons) and sampling rejected documents; and the merge of per-partition counts and
samples into data/clean/stats.json and rejected_samples.jsonl (`merge_stats`, `merge_samples`).

Dedup is global (lmforge/data/quality/dedup.py, run by lmforge/data/clean_job.py); its two steps are
counted here the same way, by `count_dedup`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmforge.data.documents import Document
from lmforge.data.quality.filters import LengthFilter, build_filters
from lmforge.data.quality.text import TextBatch, normalize_batch
from lmforge.core.params import CleanParams

DEDUP_STEPS = {"exact_dedup": "exact_duplicate", "near_dedup": "near_duplicate"}
SAMPLE_TEXT_CHARS = 2000


@dataclass
class StepCount:
    kept: int = 0
    dropped: int = 0
    dropped_bytes: int = 0
    reasons: Counter = field(default_factory=Counter)


@dataclass
class CleanStats:
    documents_in: int = 0
    bytes_in: int = 0
    documents_out: int = 0
    bytes_out: int = 0
    normalized_changed: int = 0
    steps: dict[str, StepCount] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return with_fractions({
            "documents_in": self.documents_in,
            "bytes_in": self.bytes_in,
            "documents_out": self.documents_out,
            "bytes_out": self.bytes_out,
            "normalized_changed": self.normalized_changed,
            "steps": {
                name: {
                    "kept": step.kept,
                    "dropped": step.dropped,
                    "dropped_bytes": step.dropped_bytes,
                    "reasons": dict(sorted(step.reasons.items())),
                }
                for name, step in self.steps.items()
            },
        })


def with_fractions(stats: dict[str, Any]) -> dict[str, Any]:
    """The stats.json layout: counts, then the kept fractions after documents/bytes out."""
    docs_in, bytes_in = stats["documents_in"], stats["bytes_in"]
    head = {key: stats[key] for key in ("documents_in", "bytes_in", "documents_out", "bytes_out")}
    return {
        **head,
        "kept_document_fraction": stats["documents_out"] / docs_in if docs_in else 0.0,
        "kept_byte_fraction": stats["bytes_out"] / bytes_in if bytes_in else 0.0,
        "normalized_changed": stats["normalized_changed"],
        "steps": stats["steps"],
    }


@dataclass
class Filtered:
    """What survived the filters in one batch: the documents (normalized text) and, per
    survivor, its row in the input, its raw size and its clean size in UTF-8 bytes."""

    docs: list[Document]
    rows: np.ndarray
    raw_bytes: np.ndarray
    clean_bytes: np.ndarray


class Cleaner:
    """Normalizes documents and applies the quality filters, batch by batch, counting each step.

    Each step sees a whole batch (only the documents still alive count), so the filters run
    vectorized; drops are then booked in document order, as if one document at a time. The
    dedup steps are counted later (`count_dedup`), once the global dedup has decided.
    """

    def __init__(self, params: CleanParams) -> None:
        self.params = params
        self.filters = build_filters(params)
        self.length = next(step for step in self.filters if isinstance(step, LengthFilter))
        dedups = [name for name in DEDUP_STEPS if getattr(params, name)]
        self.stats = CleanStats(steps={name: StepCount() for name in [step.name for step in self.filters] + dedups})
        # The first rejected_samples_per_reason rejected documents of each reason, with their row.
        self.samples: list[dict[str, Any]] = []
        self._sampled: Counter = Counter()
        self._rows = 0

    def sample(self, step: str, reason: str, doc: Document, raw_text: str, row: int, chars: int | None = None) -> None:
        if self._sampled[reason] < self.params.rejected_samples_per_reason:
            self._sampled[reason] += 1
            self.samples.append(sample_row(step, reason, doc, raw_text, row, chars))

    def clean_batch(self, batch: pa.RecordBatch) -> Filtered:
        """The documents of `batch` (rows of the documents schema, as read) that every filter keeps,
        normalized, in order.

        A text over `max_chars` is dropped by the length filter before anything else: it is never
        turned into Python, normalized or split (that costs ~30 times its size), so the cleaning's
        memory is bounded by max_chars; the longest document costs only its reading."""
        first_row, self._rows = self._rows, self._rows + batch.num_rows
        if not batch.num_rows:
            return Filtered([], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
        text_column = batch.schema.get_field_index("text")
        raw = pc.fill_null(batch.column(text_column), "")
        sizes = pc.binary_length(raw).to_numpy(zero_copy_only=False).astype(np.int64)
        raw_chars = pc.utf8_length(raw).to_numpy(zero_copy_only=False).astype(np.int64)
        too_long = self.length.too_long(raw_chars)
        if too_long.any():
            raw = pc.if_else(pa.array(too_long), pa.scalar("", raw.type), raw)
        docs = batch.set_column(text_column, "text", raw).to_pylist()
        raw_texts = [doc["text"] for doc in docs]
        self.stats.documents_in += len(docs)
        self.stats.bytes_in += int(sizes.sum())
        normalized = normalize_batch(raw)
        changed = pc.fill_null(pc.not_equal(normalized, raw), True).to_numpy(zero_copy_only=False)
        self.stats.normalized_changed += int(changed.sum())
        text_batch = TextBatch(normalized)

        alive = ~too_long
        dropped_by = np.where(too_long, self.filters.index(self.length), -1)  # index of the filter
        codes = np.where(too_long, self.length.reasons.index("too_many_chars") + 1, 0)
        for index, step in enumerate(self.filters):
            step_codes = step.reject_codes(text_batch, alive)
            dropped = alive & (step_codes > 0)
            dropped_by[dropped] = index
            codes[dropped] = step_codes[dropped]
            alive[dropped] = False
            self.stats.steps[step.name].kept += int(alive.sum())

        for index in np.flatnonzero(dropped_by >= 0).tolist():
            step = self.filters[dropped_by[index]]
            reason = step.reasons[codes[index] - 1]
            count = self.stats.steps[step.name]
            count.dropped += 1
            count.dropped_bytes += int(sizes[index])
            count.reasons[reason] += 1
            if too_long[index]:  # its sample cut in Arrow: the whole text never becomes a Python string
                cut = pc.utf8_slice_codeunits(batch.column(text_column).slice(index, 1), 0, SAMPLE_TEXT_CHARS)
                self.sample(step.name, reason, docs[index], cut[0].as_py(), first_row + index, int(raw_chars[index]))
            else:
                self.sample(step.name, reason, docs[index], raw_texts[index], first_row + index)

        texts = list(raw_texts)
        for index, text in zip(np.flatnonzero(changed).tolist(), normalized.filter(pa.array(changed)).to_pylist()):
            texts[index] = text
        survivors = np.flatnonzero(alive)
        clean_bytes = pc.binary_length(normalized.filter(pa.array(alive))).to_numpy(zero_copy_only=False).astype(np.int64)
        self.stats.documents_out += len(survivors)
        self.stats.bytes_out += int(clean_bytes.sum())
        # The id stays the raw document's: it decides the split, which must not move
        # when cleaning thresholds change.
        kept = [dict(docs[index], text=texts[index]) for index in survivors.tolist()]
        return Filtered(kept, survivors + first_row, sizes[survivors], clean_bytes)


def sample_row(step: str, reason: str, doc: Document, raw_text: str, row: int, chars: int | None = None) -> dict[str, Any]:
    """A rejected_samples.jsonl row (the raw text, cut), with its input row for ordering; `chars`:
    the raw text's length when `raw_text` is already cut."""
    return {
        "reason": reason,
        "step": step,
        "id": doc["id"],
        "source": doc.get("source"),
        "name": doc.get("name"),
        "chars": len(raw_text) if chars is None else chars,
        "text": raw_text[:SAMPLE_TEXT_CHARS],
        "row": row,
    }


def count_dedup(stats: dict[str, Any], dropped: dict[str, np.ndarray], raw_bytes: np.ndarray,
                clean_bytes: np.ndarray) -> dict[str, Any]:
    """`stats` of the filters (a partition's) with the dedup steps booked: `dropped` maps each
    dedup step that ran to a mask over the filters' survivors, whose sizes are given."""
    alive = np.ones(len(raw_bytes), dtype=bool)
    steps = dict(stats["steps"])
    for name, mask in dropped.items():
        mask = mask & alive
        alive &= ~mask
        count = int(mask.sum())
        steps[name] = {"kept": int(alive.sum()), "dropped": count, "dropped_bytes": int(raw_bytes[mask].sum()),
                       "reasons": {DEDUP_STEPS[name]: count} if count else {}}
    return with_fractions({**stats, "steps": steps, "documents_out": int(alive.sum()),
                           "bytes_out": int(clean_bytes[alive].sum())})


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The stats of a corpus: the sum of its partitions' stats (same layout)."""
    total: dict[str, Any] = {key: sum(part[key] for part in parts)
                             for key in ("documents_in", "bytes_in", "documents_out", "bytes_out", "normalized_changed")}
    steps: dict[str, dict[str, Any]] = {}
    for part in parts:
        for name, step in part["steps"].items():
            into = steps.setdefault(name, {"kept": 0, "dropped": 0, "dropped_bytes": 0, "reasons": Counter()})
            for key in ("kept", "dropped", "dropped_bytes"):
                into[key] += step[key]
            into["reasons"].update(step["reasons"])
    total["steps"] = {name: dict(step, reasons=dict(sorted(step["reasons"].items()))) for name, step in steps.items()}
    return with_fractions(total)


def merge_samples(parts: list[list[dict[str, Any]]], per_reason: int) -> list[dict[str, Any]]:
    """rejected_samples.jsonl: the first `per_reason` rejected documents of each reason in the
    corpus order (partition, then row), grouped by reason in the order the reasons first occur."""
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for samples in parts:
        for row in sorted(samples, key=lambda sample: sample["row"]):
            rows = by_reason.setdefault(row["reason"], [])
            if len(rows) < per_reason:
                rows.append({key: value for key, value in row.items() if key != "row"})
    return [row for rows in by_reason.values() for row in rows]

