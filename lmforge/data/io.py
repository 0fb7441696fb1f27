"""File I/O shared by the data stages: atomic writes (temp name, then rename) and
streaming Parquet reads/writes of documents with clear errors for missing or corrupt files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.data.documents import DOCUMENT_SCHEMA, Document, check_columns, to_record_batch
from lmforge.errors import LmforgeError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds.

    A reader therefore sees the old file or the complete new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


class DocumentWriter:
    """Streams document batches into one Parquet file (a row group per batch), atomically."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.documents = 0
        self.bytes = 0
        self._context = atomic_path(self.path)
        self._tmp = self._context.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, DOCUMENT_SCHEMA, compression="zstd")

    def write(self, docs: list[Document]) -> None:
        if not docs:
            return
        self._writer.write_batch(to_record_batch(docs))
        self.documents += len(docs)
        self.bytes += sum(len(doc["text"].encode("utf-8", "surrogatepass")) for doc in docs)

    def close(self) -> None:
        self._writer.close()
        self._context.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        self._writer.close()
        self._context.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> DocumentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(exc)


def open_documents(path: str | Path, stage_hint: str) -> pq.ParquetFile:
    """Open a documents file written by an earlier stage, or say which stage to rerun."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path} not found: run `dvc repro {stage_hint}` first")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise LmforgeError(f"{path} is not a readable Parquet file ({exc}); rerun `dvc repro -f {stage_hint}`") from None
    check_columns(parquet.schema_arrow.names, str(path), {"id": "written by ingest", "text": "written by ingest"})
    return parquet


def iter_document_batches(path: str | Path, batch_size: int, stage_hint: str) -> Iterator[list[Document]]:
    """Documents of a Parquet file, `batch_size` at a time (memory bounded by the batch)."""
    parquet = open_documents(path, stage_hint)
    try:
        for batch in parquet.iter_batches(batch_size=batch_size):
            yield batch.to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise LmforgeError(f"{path} is corrupt ({exc}); rerun `dvc repro -f {stage_hint}`") from None
