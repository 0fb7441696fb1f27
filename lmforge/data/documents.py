"""The document contract every data stage shares: schema, content-derived ids, the split, and the
streaming Parquet writer of documents (lmforge.data.partitions reads them back, with clear errors).

A document is a dict with `id`, `text`, `source` and the metadata columns below; the
train/val split is a pure function of `id`, so every stage agrees on what is held out.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.core.digests import written_md5
from lmforge.core.errors import naming_full_disk
from lmforge.core.io import atomic_path

# Metadata columns every source fills (None where it does not apply), so the raw
# Parquet file has one schema whatever the source.
DOCUMENT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.large_string()),
        ("source", pa.string()),
        ("module", pa.string()),  # builtin: dotted module path, e.g. "json.decoder"
        ("package", pa.string()),  # builtin: top-level package, e.g. "json"
        ("kind", pa.string()),  # builtin: module | class | function | topic
        ("name", pa.string()),  # builtin: qualified name; files: path; hf: dataset name
        ("signature", pa.string()),  # builtin functions: "def f(a, b=1) -> int"
    ]
)
METADATA_COLUMNS = [name for name in DOCUMENT_SCHEMA.names if name not in ("id", "text", "source")]

Document = dict[str, Any]


def document_id(text: str) -> str:
    """Stable, content-derived id: the same text always gets the same id (and split)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def make_document(text: str, source: str, **metadata: Any) -> Document:
    unknown = set(metadata) - set(METADATA_COLUMNS)
    if unknown:
        raise ValueError(f"unknown document metadata {sorted(unknown)}; allowed: {METADATA_COLUMNS}")
    doc: Document = {"id": document_id(text), "text": text, "source": source}
    doc.update({column: metadata.get(column) for column in METADATA_COLUMNS})
    return doc


def split_of(doc_id: str, val_fraction: float) -> str:
    """'val' or 'train', from the id's hash alone (the id is already a uniform hash)."""
    bucket = int(doc_id[:8], 16) / 0x1_0000_0000
    return "val" if bucket < val_fraction else "train"


def to_record_batch(docs: list[Document]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(docs, schema=DOCUMENT_SCHEMA)


def check_columns(columns: list[str], path: str, required: Mapping[str, str]) -> None:
    """Raise a clear error when a file lacks a column a stage needs."""
    from lmforge.core.errors import LmforgeError

    missing = [name for name in required if name not in columns]
    if missing:
        hints = "; ".join(f"'{name}': {required[name]}" for name in missing)
        raise LmforgeError(f"{path} has no column(s) {missing} (it has {columns}); {hints}")


class DocumentWriter:
    """Streams document batches into one Parquet file (a row group per batch), atomically."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.documents = 0
        self.bytes = 0
        self._context = atomic_path(self.path)
        self._tmp = self._context.__enter__()
        with naming_full_disk(self.path):
            self._sink = _Md5Writer(self._tmp)
            self._writer = pq.ParquetWriter(self._sink, DOCUMENT_SCHEMA, compression="zstd")

    def write(self, docs: list[Document]) -> None:
        if not docs:
            return
        with naming_full_disk(self.path):
            self._writer.write_batch(to_record_batch(docs))
        self.documents += len(docs)
        self.bytes += sum(len(doc["text"].encode("utf-8", "surrogatepass")) for doc in docs)

    def close(self) -> None:
        with naming_full_disk(self.path):
            self._writer.close()
            self._sink.close()
        self._context.__exit__(None, None, None)
        written_md5(self.path, self._sink.md5.hexdigest())

    def abort(self, exc: BaseException) -> None:
        with contextlib.suppress(Exception):  # the file is discarded: a close that fails too (a full disk) is moot
            self._writer.close()
        with contextlib.suppress(Exception):
            self._sink.close()
        self._context.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> DocumentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(exc)


class _Md5Writer(io.BufferedWriter):
    """A file that hashes what is written to it: the md5 the stage run's output tags need, without
    reading the file back (lmforge.core.digests.written_md5)."""

    def __init__(self, path: Path) -> None:
        super().__init__(io.FileIO(path, "wb"), buffer_size=1 << 20)
        self.md5 = hashlib.md5()

    def write(self, data: Any) -> int:
        self.md5.update(data)
        return super().write(data)
