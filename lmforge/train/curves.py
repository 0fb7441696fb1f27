"""Training-run figures that are not the loop itself: the unigram baseline, the per-step
curve (persisted beside the checkpoints so a resumed run keeps its history), CSVs for
`dvc plots` and the loss-curve image.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.core.io import save_figure, write_csv


def unigram_entropy(rows: Iterable[np.ndarray], vocab_size: int) -> float:
    """Entropy (nats/token) of the token distribution: the loss of the best model that
    ignores context. A language model that learned anything sits far below it."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for block in rows:
        counts += np.bincount(np.asarray(block).ravel(), minlength=vocab_size)[:vocab_size]
    total = counts.sum()
    if total == 0:
        return float("nan")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def first_train_loss(curve_csv: str | Path) -> float | None:
    """The first finite train_loss of a curve.csv (write_curve_csv's): the loss of the initial
    weights, on the first step's batch; None when the file or the column is missing."""
    path = Path(curve_csv)
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            try:
                value = float(row.get("train_loss") or "nan")
            except ValueError:
                continue
            if math.isfinite(value):
                return value
    return None


class CurveLog:
    """Per-step metrics appended to a JSONL file beside the checkpoints; a step logged twice
    (replayed after a resume from the last checkpoint) keeps its latest values."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, step: int, metrics: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: v for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **clean}) + "\n")

    def read(self, up_to_step: int | None = None) -> list[dict[str, Any]]:
        """One record per step, in step order (a torn last line from a kill is skipped)."""
        by_step: dict[int, dict[str, Any]] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if up_to_step is None or record["step"] <= up_to_step:
                    by_step[record["step"]] = record
        return [by_step[step] for step in sorted(by_step)]


def write_curve_csv(path: str | Path, records: list[dict[str, Any]], columns: list[str], blank_missing: bool = False) -> None:
    """A CSV for `dvc plots`: only the rows that have every column (e.g. val rows only on eval
    steps), or with `blank_missing` one row per record and `nan` where a value is missing.
    Not an empty cell: DVC's Vega-Lite templates read "" as 0 and draw it; they skip `nan`."""
    if blank_missing:
        rows = [[math.nan if record.get(column) is None else record[column] for column in columns] for record in records]
    else:
        complete = [record for record in records if all(column in record for column in columns)]
        rows = [[record[column] for column in columns] for record in complete]
    write_csv(path, columns, rows)


def plot_loss(path: str | Path, records: list[dict[str, Any]], baseline: float | None, title: str,
              y_label: str = "cross-entropy (nats/token)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", markersize=3)
    if baseline is not None and math.isfinite(baseline):
        ax.axhline(baseline, color="gray", linestyle="--", label=f"unigram entropy {baseline:.2f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)
