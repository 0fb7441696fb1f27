"""The built-in fine-tuning tasks, made from the cleaned built-in corpus with the pretraining
split (`split_of` on the same ids), so no test example was seen in pretraining:

- classify: a stdlib docstring -> its top-level package (the K most frequent, capped per class);
- sft: a function signature -> the first line of its docstring.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from typing import Any

from lmforge.data.documents import Document, split_of

Example = dict[str, Any]


def classify_examples(
    docs: Iterable[Document], val_fraction: float, top_k: int, max_per_class: int, seed: int
) -> tuple[list[Example], list[Example], list[str]]:
    """(train, test, labels): docstrings of the K packages with most training documents.

    Training classes are capped at `max_per_class` (a seeded sample) so no package dominates;
    the test split keeps its natural distribution.
    """
    stdlib = [d for d in docs if d.get("source") == "stdlib" and d.get("package")]
    train_counts = Counter(d["package"] for d in stdlib if split_of(d["id"], val_fraction) == "train")
    labels = sorted(package for package, _ in train_counts.most_common(top_k))
    by_split: dict[str, list[Example]] = {"train": [], "val": []}
    for doc in stdlib:
        if doc["package"] in labels:
            row = {"id": doc["id"], "text": doc["text"], "label": doc["package"], "module": doc.get("module")}
            by_split[split_of(doc["id"], val_fraction)].append(row)
    rng = random.Random(seed)
    train: list[Example] = []
    for label in labels:
        rows = [row for row in by_split["train"] if row["label"] == label]
        train += rng.sample(rows, max_per_class) if len(rows) > max_per_class else rows
    rng.shuffle(train)
    return train, by_split["val"], labels


def first_line(text: str) -> str:
    """The docstring's summary line (PEP 257), or its first sentence-like line."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def sft_examples(
    docs: Iterable[Document], val_fraction: float, max_prompt_chars: int, max_response_chars: int
) -> tuple[list[Example], list[Example]]:
    """(train, test) pairs: prompt = a function's signature, response = its summary line."""
    by_split: dict[str, list[Example]] = {"train": [], "val": []}
    for doc in docs:
        signature, response = doc.get("signature"), first_line(doc["text"])
        if doc.get("kind") != "function" or not signature or not response:
            continue
        if len(signature) > max_prompt_chars or len(response) > max_response_chars:
            continue
        by_split[split_of(doc["id"], val_fraction)].append({"id": doc["id"], "prompt": signature, "response": response})
    return by_split["train"], by_split["val"]
