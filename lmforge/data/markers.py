"""Completion markers: a partition task that finished leaves one, so a rerun of a killed stage
skips it (datatrove's `skip_completed`).

A marker is keyed by everything the task's output depends on (the input partition's hash, the
stage's params, the code's format version): a marker whose key differs is stale and the task
runs again. It is written last, after the task's outputs, atomically; so a marker never names
outputs that are not complete.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmforge.core.io import atomic_path, strict_json

MARKERS_DIR = ".done"


def task_key(*parts: Any) -> str:
    """A stable hash of JSON-able parts (params as dicts, input hashes, a format version)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def marker_path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / MARKERS_DIR / f"{name}.json"


def completed(output_dir: str | Path, name: str, key: str, outputs: Iterable[Path] = ()) -> dict[str, Any] | None:
    """The result a finished task recorded under this key, or None: run the task. A task whose
    `outputs` are not all there (removed by hand, a disk swapped) runs again, marker or not."""
    if not all(Path(path).is_file() for path in outputs):
        return None
    try:
        marker = json.loads(marker_path(output_dir, name).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None  # absent, or damaged: rerunning the task is always safe
    if not isinstance(marker, dict) or marker.get("key") != key:
        return None
    return marker.get("result")


def mark_completed(output_dir: str | Path, name: str, key: str, result: dict[str, Any]) -> None:
    with atomic_path(marker_path(output_dir, name)) as tmp:
        tmp.write_text(strict_json({"key": key, "result": result}, marker_path(output_dir, name), sort_keys=True),
                       encoding="utf-8")
