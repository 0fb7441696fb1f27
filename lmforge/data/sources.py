"""Where `ingest` gets documents: the built-in corpus, local files (.txt, .jsonl, .parquet,
.csv) or a Hugging Face Hub dataset, all streamed as `Document`s with uniform counters.
"""

from __future__ import annotations

import codecs
import csv
import glob
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lmforge.data.builtin import iter_builtin_documents
from lmforge.data.documents import Document, check_columns, make_document
from lmforge.errors import LmforgeError
from lmforge.params import DataParams, HfSourceParams

logger = logging.getLogger(__name__)

# Every key is present (0 when nothing happened) so stats.json has one shape whatever the source.
COUNTER_KEYS = (
    "files_read",  # files whose contents were ingested (builtin: stdlib files parsed)
    "documents",
    "bytes",  # UTF-8 bytes of document text
    "empty_files",  # zero-byte files, skipped
    "binary_files_skipped",  # a NUL byte in the first 8 KiB
    "decode_replaced_docs",  # documents with invalid UTF-8 replaced by U+FFFD
    "rows_missing_text",  # jsonl/parquet/csv/hf rows without a non-empty string text field
    "bad_json_lines",  # .jsonl lines that are not a JSON object
    "empty_pieces",  # .txt files or separator pieces that are only whitespace
    "parse_errors",  # builtin: stdlib files ast could not parse
)
SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet", ".csv")
BINARY_SNIFF_BYTES = 8192
READ_CHUNK_BYTES = 1 << 20
# Warn about the first few bad lines of a file by line number, then only count.
MAX_WARNINGS_PER_FILE = 5
TEXT_FIELD_HINT = "set data.text_field in params.yaml to the column that holds the text"


def iter_documents(params: DataParams, counters: Counter) -> Iterator[Document]:
    """Stream the documents of `params.source`, counting into `counters` (keys: COUNTER_KEYS).

    Text is never dropped for bad encoding: invalid UTF-8 is replaced by U+FFFD and the
    document counted in "decode_replaced_docs".
    """
    counters.update({key: 0 for key in COUNTER_KEYS})
    if params.source == "builtin":
        documents = iter_builtin_documents(counters)
    elif params.source == "files":
        documents = iter_file_documents(params, counters)
    else:
        documents = iter_hf_documents(params.hf, params.text_field, counters)
    yield from _counted(documents, counters)


def _counted(documents: Iterable[Document], counters: Counter) -> Iterator[Document]:
    """Count documents and bytes in one place, and make every text valid UTF-8."""
    for doc in documents:
        try:
            size = len(doc["text"].encode("utf-8"))
        except UnicodeEncodeError:
            # Lone surrogates (JSON "\ud800" escapes) cannot be written to Arrow: replace them.
            doc = _replace_surrogates(doc)
            counters["decode_replaced_docs"] += 1
            size = len(doc["text"].encode("utf-8"))
        counters["documents"] += 1
        counters["bytes"] += size
        yield doc


def _replace_surrogates(doc: Document) -> Document:
    text = doc["text"].encode("utf-8", "replace").decode("utf-8")
    metadata = {key: value for key, value in doc.items() if key not in ("id", "text", "source")}
    return make_document(text, doc["source"], **metadata)


# ---------------------------------------------------------------- local files


def iter_file_documents(params: DataParams, counters: Counter) -> Iterator[Document]:
    """Documents of every file the `data.files` globs match, in sorted path order."""
    paths = resolve_files(params.files)
    for path in paths:  # checked before reading any, so a typo fails in seconds, not hours
        _reader_for(path)
    for path in paths:
        yield from _file_documents(path, params, counters)


def resolve_files(patterns: list[str]) -> list[str]:
    """The files the globs match (** recursive, relative to cwd), sorted, each file once."""
    found: dict[str, str] = {}  # real path -> the path as the glob spelled it
    for pattern in patterns:
        matches = [path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path)]
        if not matches:
            raise LmforgeError(
                f"data.files: {pattern!r} matches no files (relative to {os.getcwd()}); "
                "fix data.files in params.yaml"
            )
        for path in matches:
            found.setdefault(os.path.realpath(path), path)
    return sorted(found.values())


def _file_documents(path: str, params: DataParams, counters: Counter) -> Iterator[Document]:
    if os.path.getsize(path) == 0:
        counters["empty_files"] += 1
        logger.warning("skipping %s: empty file", path)
        return
    reader = _reader_for(path)
    if reader is not _parquet_texts and _looks_binary(path):
        counters["binary_files_skipped"] += 1
        logger.warning("skipping %s: binary file (NUL byte in its first 8 KiB)", path)
        return
    counters["files_read"] += 1
    for text, replaced in reader(path, params, counters):
        counters["decode_replaced_docs"] += replaced
        yield make_document(text, "files", name=path)


# A reader yields (text, whether invalid UTF-8 was replaced) for each document of a file.
Reader = Callable[[str, DataParams, Counter], Iterator[tuple[str, bool]]]


def _reader_for(path: str) -> Reader:
    readers: dict[str, Reader] = {
        ".txt": _txt_texts, ".jsonl": _jsonl_texts, ".parquet": _parquet_texts, ".csv": _csv_texts,
    }
    reader = readers.get(Path(path).suffix.lower())
    if reader is None:
        raise LmforgeError(
            f"{path}: unsupported file type; data.files may only match "
            f"{', '.join(SUPPORTED_EXTENSIONS)} files"
        )
    return reader


def _looks_binary(path: str) -> bool:
    with open(path, "rb") as file:
        return b"\0" in file.read(BINARY_SNIFF_BYTES)


def _open_text_bytes(path: str) -> BinaryIO:
    """The file in binary mode, past a UTF-8 byte order mark if it starts with one (editors
    on Windows write it; left in, it would break the first JSON line or CSV header)."""
    file = open(path, "rb")  # the caller's `with` closes it
    if file.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
        file.seek(0)
    return file


def decode_utf8(data: bytes) -> tuple[str, bool]:
    """UTF-8 text, with invalid bytes replaced (U+FFFD), and whether any were."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def _txt_texts(path: str, params: DataParams, counters: Counter) -> Iterator[tuple[str, bool]]:
    """One document per file, or one per piece between `data.txt_separator`s; stripped."""
    if params.txt_separator == "":
        raise LmforgeError("data.txt_separator is empty: set it to null for one document per file")
    with _open_text_bytes(path) as file:
        if params.txt_separator is None:
            pieces: Iterable[bytes] = [file.read()]
        else:
            pieces = _split_stream(file, params.txt_separator.encode("utf-8"))
        for piece in pieces:
            # Decoding each piece alone is exact: a UTF-8 separator never splits a character.
            text, replaced = decode_utf8(piece)
            text = text.strip()
            if not text:
                counters["empty_pieces"] += 1
                continue
            yield text, replaced


def _split_stream(file: BinaryIO, separator: bytes) -> Iterator[bytes]:
    """The pieces between separators, reading fixed-size chunks: memory stays bounded by
    the largest piece, not the file, and each byte is searched once."""
    buffer = bytearray()
    while chunk := file.read(READ_CHUNK_BYTES):
        searched = max(0, len(buffer) - len(separator) + 1)
        buffer += chunk
        if buffer.find(separator, searched) == -1:
            continue
        *pieces, rest = buffer.split(separator)
        yield from (bytes(piece) for piece in pieces)
        buffer = bytearray(rest)
    yield bytes(buffer)


def _jsonl_texts(path: str, params: DataParams, counters: Counter) -> Iterator[tuple[str, bool]]:
    """One JSON object per line, read line by line; blank lines are ignored."""
    bad_lines = 0
    with _open_text_bytes(path) as file:
        for number, raw in enumerate(file, start=1):
            line, replaced = decode_utf8(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                row, reason = None, f"not valid JSON ({exc.msg})"
            else:
                reason = "not a JSON object"
            if not isinstance(row, dict):
                bad_lines += 1
                counters["bad_json_lines"] += 1
                if bad_lines <= MAX_WARNINGS_PER_FILE:
                    logger.warning("skipping %s:%d: %s", path, number, reason)
                continue
            text = _row_text(row.get(params.text_field), counters)
            if text is not None:
                yield text, replaced
    if bad_lines > MAX_WARNINGS_PER_FILE:
        logger.warning("%s: %d lines skipped in all as not JSON objects", path, bad_lines)


def _row_text(value: Any, counters: Counter) -> str | None:
    """The row's text, or None (counted) when it is missing, not a string, or blank."""
    if isinstance(value, str) and value.strip():
        return value
    counters["rows_missing_text"] += 1
    return None


def _parquet_texts(path: str, params: DataParams, counters: Counter) -> Iterator[tuple[str, bool]]:
    """The text column, one record batch at a time (Arrow strings are valid UTF-8)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise LmforgeError(f"{path} is not a readable Parquet file: {exc}") from None
    check_columns(parquet.schema_arrow.names, path, {params.text_field: TEXT_FIELD_HINT})
    for batch in parquet.iter_batches(batch_size=params.batch_size, columns=[params.text_field]):
        for value in batch.column(0).to_pylist():
            text = _row_text(value, counters)
            if text is not None:
                yield text, False


def _csv_texts(path: str, params: DataParams, counters: Counter) -> Iterator[tuple[str, bool]]:
    """The text column of a CSV file with a header row, streamed row by row."""
    # The default limit (128 KiB) rejects long documents; C long bounds the value.
    csv.field_size_limit(2**31 - 1)
    replaced_since_row = [False]

    def lines(file: BinaryIO) -> Iterator[str]:
        # csv pulls lines only as the current row needs them, so a flag set here and
        # cleared after each row marks exactly the rows that had invalid UTF-8.
        for raw in file:
            line, replaced = decode_utf8(raw)
            replaced_since_row[0] |= replaced
            yield line

    with _open_text_bytes(path) as file:
        rows = csv.reader(lines(file))
        header = next(rows, [])
        check_columns(header, path, {params.text_field: TEXT_FIELD_HINT})
        column = header.index(params.text_field)
        replaced_since_row[0] = False
        for row in rows:
            replaced, replaced_since_row[0] = replaced_since_row[0], False
            text = _row_text(row[column] if column < len(row) else None, counters)
            if text is not None:
                yield text, replaced


# ---------------------------------------------------------------- Hugging Face Hub


def iter_hf_documents(hf: HfSourceParams, text_field: str, counters: Counter) -> Iterator[Document]:
    """Stream a Hub dataset (no full download), up to `hf.max_documents` documents."""
    rows = _open_hf(hf, text_field)
    taken = 0
    while hf.max_documents is None or taken < hf.max_documents:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # network errors mid-stream come in many types
            raise LmforgeError(_hf_message(hf, f"streaming failed: {exc}")) from exc
        text = _row_text(row.get(text_field), counters)
        if text is not None:
            taken += 1
            yield make_document(text, "hf", name=hf.name)


def _open_hf(hf: HfSourceParams, text_field: str) -> Iterator[dict[str, Any]]:
    try:
        from datasets import load_dataset

        dataset = load_dataset(
            hf.name, hf.config, split=hf.split, revision=hf.revision, streaming=True
        )
        columns = dataset.column_names
        rows = iter(dataset)
    except Exception as exc:  # offline, unknown name, bad config: all user-fixable
        raise LmforgeError(_hf_message(hf, f"could not load it: {exc}")) from exc
    if columns is not None:  # None when the stream does not declare its features
        check_columns(columns, f"data.hf.name {hf.name!r}", {text_field: TEXT_FIELD_HINT})
    return rows


def _hf_message(hf: HfSourceParams, problem: str) -> str:
    return (
        f"data.hf.name {hf.name!r} (config {hf.config!r}, split {hf.split!r}): {problem}; "
        "check data.hf in params.yaml, or use data.source: files for offline work"
    )
