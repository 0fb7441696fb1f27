"""The clean pipeline: normalize, run each quality filter, then exact and near dedup,
counting for every step what it kept and dropped (documents, bytes, reasons).

Streams batch by batch (each step vectorized over the batch; only the dedup indexes
outlive it); `CleanStats.to_dict()` is what becomes data/clean/stats.json.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmforge.data.dedup import CanonicalTexts, ExactDedup, NearDedup
from lmforge.data.documents import Document
from lmforge.data.filters import build_filters
from lmforge.data.text import TextBatch, normalize_batch
from lmforge.params import CleanParams

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
    rejected_samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents_in": self.documents_in,
            "bytes_in": self.bytes_in,
            "documents_out": self.documents_out,
            "bytes_out": self.bytes_out,
            "kept_document_fraction": self.documents_out / self.documents_in if self.documents_in else 0.0,
            "kept_byte_fraction": self.bytes_out / self.bytes_in if self.bytes_in else 0.0,
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
        }


class Cleaner:
    """Applies the configured steps to documents; keeps its dedup indexes across batches.

    Each step sees a whole batch (only the documents still alive count), so the filters
    run vectorized; drops are then booked in document order, as if one document at a time.
    """

    def __init__(self, params: CleanParams) -> None:
        self.params = params
        self.filters = build_filters(params)
        self.dedups: list[ExactDedup | NearDedup] = []
        if params.exact_dedup:
            self.dedups.append(ExactDedup())
        if params.near_dedup:
            self.dedups.append(
                NearDedup(
                    params.minhash_threshold,
                    params.minhash_num_perm,
                    params.minhash_shingle_size,
                    params.minhash_seed,
                )
            )
        self.stats = CleanStats(steps={step.name: StepCount() for step in [*self.filters, *self.dedups]})

    def _reject(self, step_name: str, reason: str, doc: Document, size: int) -> None:
        step = self.stats.steps[step_name]
        step.dropped += 1
        step.dropped_bytes += size
        step.reasons[reason] += 1
        samples = self.stats.rejected_samples.setdefault(reason, [])
        if len(samples) < self.params.rejected_samples_per_reason:
            samples.append(
                {
                    "reason": reason,
                    "step": step_name,
                    "id": doc["id"],
                    "source": doc.get("source"),
                    "name": doc.get("name"),
                    "chars": len(doc["text"]),
                    "text": doc["text"][:SAMPLE_TEXT_CHARS],
                }
            )

    def clean_one(self, doc: Document) -> Document | None:
        """The cleaned document, or None when a step dropped it (and counted why)."""
        kept = self.clean_batch([doc])
        return kept[0] if kept else None

    def clean_batch(self, docs: list[Document]) -> list[Document]:
        """The documents of `docs` that every step keeps, cleaned, in order."""
        if not docs:
            return []
        raw_texts = [doc["text"] or "" for doc in docs]
        raw = _to_arrow(raw_texts)
        sizes = pc.binary_length(raw).to_numpy(zero_copy_only=False).astype(np.int64)
        self.stats.documents_in += len(docs)
        self.stats.bytes_in += int(sizes.sum())
        normalized = normalize_batch(raw)
        changed = pc.fill_null(pc.not_equal(normalized, raw), True).to_numpy(zero_copy_only=False)
        self.stats.normalized_changed += int(changed.sum())
        batch = TextBatch(normalized)

        alive = np.ones(len(docs), dtype=bool)
        dropped_by = np.full(len(docs), -1, dtype=np.int64)  # index of the step
        codes = np.zeros(len(docs), dtype=np.int64)
        steps: list[tuple[str, tuple[str, ...]]] = []

        def book(step_codes: np.ndarray, name: str, reasons: tuple[str, ...]) -> None:
            dropped = alive & (step_codes > 0)
            dropped_by[dropped] = len(steps)
            codes[dropped] = step_codes[dropped]
            steps.append((name, tuple(reasons)))
            alive[dropped] = False
            self.stats.steps[name].kept += int(alive.sum())

        for step in self.filters:
            book(step.reject_codes(batch, alive), step.name, step.reasons)

        texts = list(raw_texts)
        for index, text in zip(np.flatnonzero(changed).tolist(), normalized.filter(pa.array(changed)).to_pylist()):
            texts[index] = text
        if self.dedups and alive.any():
            survivors = np.flatnonzero(alive)
            canonical = CanonicalTexts([texts[index] for index in survivors.tolist()])
            for dedup in self.dedups:
                step_codes = np.zeros(len(docs), dtype=np.int64)
                step_codes[survivors] = dedup.reject_codes(canonical, alive[survivors])
                book(step_codes, dedup.name, dedup.reasons)
        else:
            for dedup in self.dedups:
                book(np.zeros(len(docs), dtype=np.int64), dedup.name, dedup.reasons)

        for index in np.flatnonzero(dropped_by >= 0).tolist():
            name, reasons = steps[dropped_by[index]]
            self._reject(name, reasons[codes[index] - 1], docs[index], int(sizes[index]))
        # The id stays the raw document's: it decides the split, which must not move
        # when cleaning thresholds change.
        kept = [dict(docs[index], text=texts[index]) for index in np.flatnonzero(alive).tolist()]
        self.stats.documents_out += len(kept)
        self.stats.bytes_out += int(pc.sum(pc.binary_length(normalized.filter(pa.array(alive)))).as_py() or 0)
        return kept

    def clean_batches(self, batches: Iterable[list[Document]]) -> Iterator[list[Document]]:
        for batch in batches:
            yield self.clean_batch(batch)


def _to_arrow(texts: list[str]) -> pa.Array:
    try:
        return pa.array(texts, pa.large_string())
    except (pa.ArrowException, UnicodeEncodeError):
        # Lone surrogates cannot be Arrow strings: they are replaced by U+FFFD first.
        return pa.array(
            [text.encode("utf-8", "replace").decode("utf-8") for text in texts], pa.large_string()
        )
