"""The data of lmforge's own lm-evaluation-harness tasks (lmforge/evaluate/tasks/*.yaml), built from
the held-out documents of data/clean: a cloze (the last word) and a four-way choice of endings.

Held-out (the val split pretraining never trains on), and a pure function of data/clean and
data.val_fraction, so the same corpus gives byte-identical task files and the same scores.
"""

from __future__ import annotations

import hashlib
import heapq
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmforge.core.io import write_jsonl
from lmforge.data.documents import Document, split_of
from lmforge.data.partitions import iter_dataset_batches

# Task name (lmforge/evaluate/tasks/<name>.yaml) -> the file its YAML reads under reports/harness/.
TASK_FILES = {"lmforge_cloze": "cloze.jsonl", "lmforge_continuation": "continuation.jsonl"}
MAX_DOCUMENTS = 1000  # held-out documents read (the smallest ids): bounded memory whatever the corpus
CONTEXT_WORDS = 48  # words kept before the answer: context enough, requests short (fast on a CPU)
MIN_CONTEXT_WORDS = 8  # fewer leave too little to guess from
ENDING_WORDS = 4  # the endings, all of one length so none stands out by it, and short: a small model
# with a context of 32 tokens (the tests') still holds one
CHOICES = 4
# Closing punctuation a document's last word may carry; the cloze answer is the word without it.
TRAILING = string.punctuation + "”’»"


def held_out_documents(clean_dir: str | Path, val_fraction: float, limit: int = MAX_DOCUMENTS) -> list[Document]:
    """The val-split documents (documents.split_of, as tokenize splits) with the `limit` smallest ids,
    in id order: streamed (nsmallest keeps `limit`), and independent of the partitioning."""
    val = (doc for batch in iter_dataset_batches(clean_dir, 4096, "clean", columns=["id", "text"])
           for doc in batch if split_of(doc["id"], val_fraction) == "val")
    return heapq.nsmallest(limit, val, key=lambda doc: doc["id"])


def cloze_items(docs: Iterable[Document]) -> list[dict[str, Any]]:
    """{id, context, target}: a document's last word (closing punctuation removed; letters only) and
    up to CONTEXT_WORDS words before it; documents too short or ending otherwise are left out."""
    items = []
    for doc in docs:
        words = doc["text"].split()
        target = words[-1].rstrip(TRAILING) if words else ""
        if len(words) > MIN_CONTEXT_WORDS and target.isalpha():
            items.append({"id": doc["id"], "context": " ".join(words[-CONTEXT_WORDS - 1:-1]), "target": target})
    return items


def continuation_items(docs: Iterable[Document]) -> list[dict[str, Any]]:
    """{id, context, endings, label}: a document's last ENDING_WORDS words among the endings of the
    next documents (in id order, wrapping; none equal to it), at a position drawn from the id's hash."""
    cut = [(doc["id"], words[:-ENDING_WORDS][-CONTEXT_WORDS:], " ".join(words[-ENDING_WORDS:]))
           for doc in docs if len(words := doc["text"].split()) >= ENDING_WORDS + MIN_CONTEXT_WORDS]
    items = []
    for i, (doc_id, context, ending) in enumerate(cut):
        others: list[str] = []
        for step in range(1, len(cut)):
            other = cut[(i + step) % len(cut)][2]
            if other != ending and other not in others:
                others.append(other)
                if len(others) == CHOICES - 1:
                    break
        if len(others) < CHOICES - 1:
            continue  # too few distinct endings to choose among
        label = int(hashlib.blake2b(doc_id.encode(), digest_size=4).hexdigest(), 16) % CHOICES
        items.append({"id": doc_id, "context": " ".join(context),
                      "endings": others[:label] + [ending] + others[label:], "label": label})
    return items


def write_task_data(docs: list[Document], out_dir: str | Path) -> dict[str, int]:
    """Every shipped task's JSONL under `out_dir` (its YAML's data_files); items per task."""
    built = {"lmforge_cloze": cloze_items(docs), "lmforge_continuation": continuation_items(docs)}
    for task, rows in built.items():
        write_jsonl(Path(out_dir) / TASK_FILES[task], rows)
    return {task: len(rows) for task, rows in built.items()}
