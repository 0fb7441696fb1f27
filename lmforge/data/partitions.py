"""Partitioned datasets: the contract between ingest, clean and tokenize.

A partitioned dataset is a directory of `part-NNNNN.parquet` files (DOCUMENT_SCHEMA) and a
`manifest.json` written last, which lists the parts in global order: documents are ordered by
part, then by row. That order does not depend on the number of workers, so "first seen wins"
in dedup and every output are the same bytes on 1 worker or many.

Partition tasks do not write into a stage's DVC output directory while they run: DVC deletes a
stage's outputs before it reruns it, which would throw away the finished partitions of a killed
run. They write into the stage's staging directory (`data/.staging/<stage>/`, ignored by git and
DVC) with a completion marker each (lmforge/data/markers.py); the driver moves the finished
parts into the output directory at the end and then clears the staging directory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.data.documents import Document, check_columns
from lmforge.core.io import atomic_path, write_json
from lmforge.core.errors import LmforgeError

MANIFEST = "manifest.json"
STAGING = Path("data/.staging")
# Bumped when the manifest's meaning changes, so an old one is rejected with a clear message.
PARTS_MANIFEST_FORMAT = 1


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def staging_dir(stage: str) -> Path:
    return STAGING / stage


def write_parts_manifest(directory: str | Path, parts: list[dict[str, Any]], **extra: Any) -> None:
    """The manifest, last: `parts` in global order, each at least {"name", "documents", "bytes"}
    ("bytes": the UTF-8 bytes of the documents' text, as DocumentWriter counts them; tokenize sizes
    its BPE sample from them)."""
    write_json(Path(directory) / MANIFEST, {
        "format": PARTS_MANIFEST_FORMAT,
        "documents": sum(part["documents"] for part in parts),
        "bytes": sum(part["bytes"] for part in parts),
        "parts": parts,
        **extra,
    })


def read_parts_manifest(directory: str | Path, stage_hint: str) -> dict[str, Any]:
    """The manifest of a partitioned dataset an earlier stage wrote, or say which stage to rerun."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"{path} not found: run `dvc repro {stage_hint}` first") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{path} is damaged ({exc}); rerun `dvc repro -f {stage_hint}`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PARTS_MANIFEST_FORMAT or "parts" not in manifest:
        raise LmforgeError(f"{path} is not a manifest of this lmforge version; rerun `dvc repro -f {stage_hint}`")
    return manifest


def part_paths(directory: str | Path, stage_hint: str) -> list[Path]:
    """The parts of a partitioned dataset in global order; each must exist."""
    directory = Path(directory)
    paths = [directory / part["name"] for part in read_parts_manifest(directory, stage_hint)["parts"]]
    for path in paths:
        if not path.is_file():
            raise LmforgeError(f"{path} is listed in {directory / MANIFEST} but missing; rerun `dvc repro -f {stage_hint}`")
    return paths


def open_part(path: str | Path, stage_hint: str) -> pq.ParquetFile:
    """Open a documents file an earlier stage wrote, or say which stage to rerun."""
    if not Path(path).is_file():
        raise LmforgeError(f"{path} not found: run `dvc repro {stage_hint}` first")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise LmforgeError(f"{path} is not a readable Parquet file ({exc}); rerun `dvc repro -f {stage_hint}`") from None
    check_columns(parquet.schema_arrow.names, str(path), {"id": f"written by {stage_hint}", "text": f"written by {stage_hint}"})
    return parquet


def iter_part_batches(path: str | Path, batch_size: int, stage_hint: str,
                      columns: list[str] | None = None) -> Iterator[list[Document]]:
    """Documents of one part, `batch_size` at a time (memory bounded by the batch)."""
    for batch in iter_part_arrow(path, batch_size, stage_hint, columns):
        yield batch.to_pylist()


def iter_part_arrow(path: str | Path, batch_size: int, stage_hint: str,
                    columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The same batches as Arrow record batches, for a reader that looks before it converts."""
    parquet = open_part(path, stage_hint)
    try:
        yield from parquet.iter_batches(batch_size=batch_size, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise LmforgeError(f"{path} is corrupt ({exc}); rerun `dvc repro -f {stage_hint}`") from None


def iter_dataset_batches(directory: str | Path, batch_size: int, stage_hint: str,
                         columns: list[str] | None = None) -> Iterator[list[Document]]:
    """Every document of a partitioned dataset in global order (for small consumers such as
    finetune_data; partition tasks read their own part with iter_part_batches)."""
    for path in part_paths(directory, stage_hint):
        yield from iter_part_batches(path, batch_size, stage_hint, columns)


def publish(staged: list[Path], output_dir: str | Path, under: Path | None = None) -> None:
    """Move a data stage's finished files from staging into its output directory (a rename each on
    one filesystem, a copy across), each at its path relative to `under` (its name alone when None).
    The directory is replaced: what an earlier run left there goes first (parts, shards, its
    manifest), so it holds exactly this run's files and a reader never sees a manifest over a mix;
    the caller writes the manifest after this."""
    output_dir = Path(output_dir)
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in staged:
        target = output_dir / (path.relative_to(under) if under is not None else path.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(path, tmp) if not _same_device(path, target.parent) else os.replace(path, tmp)


def clear_staging_dir(directory: str | Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def _same_device(path: Path, directory: Path) -> bool:
    return path.stat().st_dev == directory.stat().st_dev
