"""The mixture of named sources in the train split: how many times each document is packed so each
source gets its weight's share of training tokens, and the mixture that came out (pure functions;
lmforge.data.tokens.pack applies them, lmforge.data.tokenize_job plans and reports them).

A source's factor is its asked tokens over its own: 2.5 packs every document twice (two whole
epochs) and half of them once more (a partial epoch), 0.4 keeps 40% of them. Which documents make a
partial epoch is a hash of the id, so the same corpus and weights give the same shards, on any
number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lmforge.core.errors import LmforgeError

# Columns of mixture.csv, the plot `dvc plots show` draws of the realised mixture.
CSV_COLUMNS = ("source", "weight", "share", "tokens", "documents", "epochs")


def normalised(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights as shares that sum to 1 (7 and 3 are 0.7 and 0.3)."""
    total = sum(weights.values())
    return {name: weight / total for name, weight in weights.items()}


def source_factors(tokens: Mapping[str, int], weights: Mapping[str, float]) -> dict[str, float]:
    """Copies of each source's train tokens that give it its weight's share of the train split,
    whose size stays the corpus's own (the sum of `tokens`): a factor above 1 repeats the source,
    below 1 subsamples it. `tokens`: each source's train tokens, EOS included."""
    empty = [name for name in weights if tokens.get(name, 0) <= 0]
    if empty:
        raise LmforgeError(f"data.sources {empty} have no train tokens after clean, so mix.weights cannot give them "
                           "a share: check their files (and clean's stats.json), or remove them from data.sources "
                           "and mix.weights")
    total = sum(tokens[name] for name in weights)
    return {name: share * total / tokens[name] for name, share in normalised(weights).items()}


def copies(doc_id: str, factor: float) -> int:
    """How many times a document of a source with `factor` is packed: the whole epochs, plus one
    when its hash falls in the partial epoch's share."""
    whole = math.floor(factor)
    return whole + (_unit(doc_id) < factor - whole)


def _unit(doc_id: str) -> float:
    # Hex digits 16-24 of the id: independent of the split (digits 0-8) and the BPE sample (8-16).
    return int(doc_id[16:24], 16) / 0x1_0000_0000


def realised(weights: Mapping[str, float], train: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, Any]]:
    """Per source: the asked `weight` (normalised), the `share` of train tokens it got, its `tokens`
    and `documents` packed (repeats counted), and `epochs`: packed over own tokens (1.0 unmixed).
    `train`: name -> {"tokens", "documents", "unique_tokens", "unique_documents"}."""
    total = sum(counts["tokens"] for counts in train.values())
    asked = normalised(weights)
    return {name: {"weight": round(asked[name], 6),
                   "share": round(counts["tokens"] / total, 6) if total else 0.0,
                   "tokens": counts["tokens"], "documents": counts["documents"],
                   "unique_tokens": counts["unique_tokens"], "unique_documents": counts["unique_documents"],
                   "epochs": round(counts["tokens"] / counts["unique_tokens"], 4) if counts["unique_tokens"] else 0.0}
            for name, counts in train.items()}


def mixture_csv(mixture: Mapping[str, Mapping[str, Any]]) -> str:
    """The realised mixture as CSV, one row per source (CSV_COLUMNS)."""
    rows = [",".join(CSV_COLUMNS)]
    rows += [",".join(str(name if column == "source" else figures[column]) for column in CSV_COLUMNS)
             for name, figures in mixture.items()]
    return "\n".join(rows) + "\n"
