"""The clean pipeline: normalize, run each quality filter, then exact and near dedup,
counting for every step what it kept and dropped (documents, bytes, reasons).

Streams batch by batch; `CleanStats.to_dict()` is what becomes data/clean/stats.json.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lmforge.data.dedup import ExactDedup, NearDedup
from lmforge.data.documents import Document
from lmforge.data.filters import build_filters, normalize, split_words
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
    """Applies the configured steps to documents; keeps its dedup indexes across batches."""

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
        raw = doc["text"] or ""
        size = len(raw.encode("utf-8", "surrogatepass"))
        self.stats.documents_in += 1
        self.stats.bytes_in += size
        text = normalize(raw)
        if text != raw:
            self.stats.normalized_changed += 1
        words = split_words(text)
        for step in self.filters:
            reason = step.reject_reason(text, words)
            if reason is not None:
                self._reject(step.name, reason, doc, size)
                return None
            self.stats.steps[step.name].kept += 1
        for dedup in self.dedups:
            reason = dedup.reject_reason(text)
            if reason is not None:
                self._reject(dedup.name, reason, doc, size)
                return None
            self.stats.steps[dedup.name].kept += 1
        # The id stays the raw document's: it decides the split, which must not move
        # when cleaning thresholds change.
        cleaned = dict(doc, text=text)
        self.stats.documents_out += 1
        self.stats.bytes_out += len(text.encode("utf-8", "surrogatepass"))
        return cleaned

    def clean_batches(self, batches: Iterable[list[Document]]) -> Iterator[list[Document]]:
        for batch in batches:
            yield [cleaned for doc in batch if (cleaned := self.clean_one(doc)) is not None]
