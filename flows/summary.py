"""The flow's summary: the metrics files dvc.yaml lists, read into numbers, and the markdown
artifact `lmforge-pipeline-summary` (stages, results, metrics, a link to the MLflow run), redacted."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from lmforge.redact import redact

SUMMARY_KEY = "lmforge-pipeline-summary"


def _flat_numbers(data: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            out.update(_flat_numbers(value, f"{prefix}{key}."))
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        out[prefix.rstrip(".")] = data
    return out


def read_metrics(root: Path, metrics_files: Mapping[str, list[str]]) -> dict[str, dict[str, float]]:
    """stage -> its metrics (the numbers in the metrics files dvc.yaml lists for it)."""
    shown: dict[str, dict[str, float]] = {}
    for stage, files in metrics_files.items():
        values: dict[str, float] = {}
        for name in files:
            path = root / name
            if path.is_file():
                try:
                    values.update(_flat_numbers(json.loads(path.read_text(encoding="utf-8"))))
                except (json.JSONDecodeError, OSError):
                    pass
        shown[stage] = values
    return shown


def mlflow_run_url(run_id: str, experiment_id: str) -> str:
    from lmforge.tracking import tracking_uri

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        return redact(f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}")
    return redact(f"{tracking_uri()} (local store: `mlflow ui --backend-store-uri {tracking_uri()}`)")


def summary_markdown(results: list[dict[str, Any]], metrics: Mapping[str, Mapping[str, float]], run_id: str,
                     url: str, overrides: list[str], outcome: str, experiment: str | None) -> str:
    lines = [
        f"# lmforge pipeline: {outcome}",
        "",
        f"MLflow run `pipeline`: `{run_id}` — {url}",
        "",
        f"Overrides: {', '.join(f'`{o}`' for o in overrides) if overrides else 'none'}"
        + (f" (DVC experiment `{experiment}`)" if experiment else ""),
        "",
        "| stage | result | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} |" for r in results]
    lines += ["", "## Metrics", ""]
    for stage, values in metrics.items():
        if values:
            lines += [f"### {stage}", "", "| metric | value |", "|---|---|"]
            lines += [f"| {key} | {value:.6g} |" for key, value in values.items()]
            lines.append("")
    return redact("\n".join(lines))  # the URL, the overrides and the outcome may all carry one


def publish_summary(results: list[dict[str, Any]], repo: Path, metrics_files: Mapping[str, list[str]],
                    run_id: str, url: str, overrides: list[str], outcome: str,
                    experiment: str | None) -> dict[str, dict[str, float]]:
    """Publish the summary artifact of this flow run; returns the metrics it shows."""
    from prefect.artifacts import create_markdown_artifact

    metrics = read_metrics(repo, metrics_files)
    try:
        create_markdown_artifact(markdown=summary_markdown(results, metrics, run_id, url, overrides, outcome,
                                                           experiment),
                                 key=SUMMARY_KEY, description=redact(f"lmforge pipeline: {outcome}"))
    except Exception as exc:  # noqa: BLE001 - a lost summary must not hide the run's own outcome or error
        get_run_logger().warning("summary artifact %s not published: %s", SUMMARY_KEY, redact(str(exc)))
    return metrics
