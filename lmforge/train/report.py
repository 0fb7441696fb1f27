"""What a training stage reports at its end, as plain data: the report files (written here, the same
whether tracking is up or down) and the card of the model to register (track.training.finish logs both).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.core.io import write_json
from lmforge.train.curves import plot_loss, write_curve_csv

TensorSpecs = dict[str, tuple[str, tuple[int, ...]]]


@dataclass
class TrainingReport:
    """What a training stage reports at its end: `summary` in full as reports/<stage>/stats.json, the
    `compared` keys as metrics.json, the curve as curve.csv (`columns`) and loss.png; on its MLflow run
    the `final` keys as metrics at the last step, the `tagged` keys as `lmforge.<key>` tags, the
    description and `artifacts` ({artifact folder: files})."""

    reports: Path
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    compared: tuple[str, ...]
    columns: list[str]
    title: str
    baseline: float | None
    final: tuple[str, ...]
    tagged: tuple[str, ...]
    description: str
    artifacts: dict[str, list[Path]]
    loss_label: str = "cross-entropy (nats/token)"  # loss.png's y axis: what one unit of the loss is


@dataclass
class Registration:
    """The exported model the tracking agent registers (lmforge.track.registration): how it is read
    back from its directory (`loader`), its name, weights file and card."""

    loader: str  # `pretrained` | `finetuned`
    name: str
    weights: Path
    description: str
    figures: Mapping[str, float | None]
    signature: tuple[TensorSpecs, TensorSpecs]  # inputs, outputs: {name: (numpy dtype, shape)}, -1 any size
    input_example: tuple[Any, ...]  # numpy arrays, one per signature input: torch.export traces the model on them
    datasets: Mapping[str, Path] | None = None


def write_reports(report: TrainingReport) -> None:
    """curve.csv (one row per step, val columns nan between evals: `dvc plots` draws every column
    from it), loss.png, stats.json and metrics.json: the same whether tracking is up or down."""
    write_curve_csv(report.reports / "curve.csv", report.records, report.columns, blank_missing=True)
    plot_loss(report.reports / "loss.png", report.records, report.baseline, report.title, report.loss_label)
    write_json(report.reports / "stats.json", report.summary)
    write_json(report.reports / "metrics.json",
               {key: report.summary[key] for key in report.compared if report.summary.get(key) is not None})
