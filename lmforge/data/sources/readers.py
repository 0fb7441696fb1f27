"""How each input file format becomes text: a file, or a slice of it (`FileRange`), read as .txt
documents or as the rows of a table (.jsonl, .parquet, .csv), with invalid UTF-8 replaced and flagged.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from lmforge.data.documents import check_columns
from lmforge.data.sources.locations import open_input
from lmforge.core.errors import LmforgeError
from lmforge.core.params import DataParams

logger = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1 << 20
# Warn about the first few bad lines of a file by line number, then only count.
MAX_WARNINGS_PER_FILE = 5


class FileRange(NamedTuple):
    """A slice of one input file: byte offsets `start` to `stop` for .jsonl lines and .txt separator
    pieces (a piece belongs to the slice in which the separator before it ends; see _boundary), row
    groups `start` to `stop` for .parquet; (0, None) is the whole file."""

    path: str  # as the glob spelled it: the documents' `name` and the messages
    location: str  # absolute path or URL: where a worker on any machine reads it
    start: int = 0
    stop: int | None = None


def _open_text_bytes(location: str) -> BinaryIO:
    """The file in binary mode, past a UTF-8 byte order mark if it starts with one (editors
    on Windows write it; left in, it would break the first JSON line or CSV header)."""
    file = open_input(location)  # the caller's `with` closes it
    if file.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
        file.seek(0)
    return file


@contextmanager
def _open_slice(part: FileRange, separator: bytes) -> Iterator[tuple[BinaryIO, int | None]]:
    """The file positioned at the start of the slice, and how many bytes the slice holds (None: to
    the end of the file). A slice runs from the end of the first separator at or after `start` to
    the end of the first separator at or after `stop`: both neighbours compute the same boundary,
    so every piece is read by exactly one slice."""
    with _open_text_bytes(part.location) as file:
        begin = _boundary(file, part.start, separator) if part.start else file.tell()
        end = _boundary(file, part.stop, separator) if part.stop is not None else None
        if begin is None:  # no separator after `start`: the previous slice read to the end
            yield file, 0
            return
        file.seek(begin)
        yield file, None if end is None else max(0, end - begin)


def _boundary(file: BinaryIO, cut: int, separator: bytes) -> int | None:
    """The offset just after the first `separator` that starts at or after `cut`; None if none."""
    file.seek(cut)
    position, tail = cut, b""  # `tail`: the last bytes of the previous chunk, for a split separator
    while chunk := file.read(READ_CHUNK_BYTES):
        buffer = tail + chunk
        found = buffer.find(separator)
        if found != -1:
            return position - len(tail) + found + len(separator)
        keep = len(separator) - 1
        tail = buffer[len(buffer) - keep:] if keep else b""
        position += len(chunk)
    return None


class _Limited:
    """A binary reader that stops after `limit` bytes (None: never)."""

    def __init__(self, file: BinaryIO, limit: int | None) -> None:
        self.file, self.left = file, limit

    def read(self, size: int = -1) -> bytes:
        if self.left is None:
            return self.file.read(size)
        size = self.left if size < 0 else min(size, self.left)
        data = self.file.read(size)
        self.left -= len(data)
        return data

    def __iter__(self) -> Iterator[bytes]:
        # Lines of a slice: it ends just after a "\n", so no line runs past it.
        while self.left is None or self.left > 0:
            line = self.file.readline()
            if not line:
                return
            if self.left is not None:
                self.left -= len(line)
            yield line


def decode_utf8(data: bytes) -> tuple[str, bool]:
    """UTF-8 text, with invalid bytes replaced (U+FFFD), and whether any were."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def without_surrogates(value: Any) -> tuple[Any, bool]:
    """A string without lone surrogates (JSON "\\ud800" escapes: Arrow and the tokenizer refuse
    them), each replaced by "?", and whether any were; other values as they are."""
    if not isinstance(value, str):
        return value, False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8"), True
    return value, False


# ---------------------------------------------------------------- .txt


def txt_texts(part: FileRange, params: DataParams, counters: Counter) -> Iterator[tuple[str, bool]]:
    """One document per file, or one per piece between `data.txt_separator`s; stripped."""
    if params.txt_separator == "":
        raise LmforgeError("data.txt_separator is empty: set it to null for one document per file")
    if params.txt_separator is None:
        with _open_text_bytes(part.location) as file:
            yield from _txt_pieces([file.read()], counters)
        return
    separator = params.txt_separator.encode("utf-8")
    with _open_slice(part, separator) as (file, size):
        pieces = _split_stream(_Limited(file, size), separator)  # type: ignore[arg-type]
        if size is not None:
            # A slice ends just after a separator: its last piece is the empty one after it,
            # which belongs to no document (the next slice starts there).
            pieces = _without_last_empty(pieces)
        yield from _txt_pieces(pieces, counters)


def _without_last_empty(pieces: Iterable[bytes]) -> Iterator[bytes]:
    previous = None
    for piece in pieces:
        if previous is not None:
            yield previous
        previous = piece
    if previous:
        yield previous


def _txt_pieces(pieces: Iterable[bytes], counters: Counter) -> Iterator[tuple[str, bool]]:
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


# ---------------------------------------------------------------- tables (.jsonl, .parquet, .csv)
# One reader per format, shared by ingest (the text field) and fine-tuning (text, label, prompt,
# response), so both treat bad input alike: invalid UTF-8 replaced and flagged, lines that are not
# JSON objects skipped and counted in "bad_json_lines", a file that is not Parquet or CSV at all,
# or lacks a required column, an error naming the file.


class Row(NamedTuple):
    where: str  # "file:line" (.jsonl, .csv) or "file row n" (.parquet), for messages
    values: dict[str, Any]  # every requested column; None where the row has no value
    replaced: bool  # invalid UTF-8 replaced by U+FFFD (lone surrogates by "?")


def row_text(value: Any) -> str | None:
    """A row's text field, or None when it is missing, not a string (a list, a number...) or
    blank: such a row is skipped and counted, never stringified."""
    return value if isinstance(value, str) and value.strip() else None


def iter_table_rows(
    path: str | FileRange, columns: list[str], required: Mapping[str, str], counters: Counter, batch_size: int = 2000
) -> Iterator[Row]:
    """The `columns` of each row of a .jsonl, .parquet or .csv file (or of a slice of it), streamed.

    `required`: column -> hint, for the columns a .parquet/.csv header must have (the error names
    the file, its columns and the hint); a .jsonl row without them gives None, like a null value.
    """
    part = path if isinstance(path, FileRange) else FileRange(path, path)
    reader = TABLE_READERS.get(Path(part.path).suffix.lower())
    if reader is None:
        raise LmforgeError(f"{part.path}: not a table; use a {', '.join(TABLE_READERS)} file")
    yield from reader(part, columns, required, counters, batch_size)


def _jsonl_rows(
    part: FileRange, columns: list[str], required: Mapping[str, str], counters: Counter, batch_size: int
) -> Iterator[Row]:
    """One JSON object per line, read line by line; blank lines are ignored. Lines of a slice are
    numbered from the slice's first byte (a slice does not know how many lines precede it)."""
    bad_lines = 0
    path = part.path if part.start == 0 else f"{part.path} (byte {part.start}+)"
    with _open_slice(part, b"\n") as (file, size):
        for number, raw in enumerate(_Limited(file, size), start=1):
            line, replaced = decode_utf8(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as exc:  # also too deep nesting, too long integers
                row, reason = None, f"not valid JSON ({getattr(exc, 'msg', exc)})"
            else:
                reason = "not a JSON object"
            if not isinstance(row, dict):
                bad_lines += 1
                counters["bad_json_lines"] += 1
                if bad_lines <= MAX_WARNINGS_PER_FILE:
                    logger.warning("skipping %s:%d: %s", path, number, reason)
                continue
            values = {}
            for column in columns:
                values[column], fixed = without_surrogates(row.get(column))
                replaced |= fixed
            yield Row(f"{path}:{number}", values, replaced)
    if bad_lines > MAX_WARNINGS_PER_FILE:
        logger.warning("%s: %d lines skipped in all as not JSON objects", path, bad_lines)


def _parquet_rows(
    part: FileRange, columns: list[str], required: Mapping[str, str], counters: Counter, batch_size: int
) -> Iterator[Row]:
    """The columns, one record batch at a time (Arrow strings are valid UTF-8); a slice is row
    groups `start` to `stop`."""
    path = part.path
    with open_input(part.location) as handle:
        parquet = open_parquet(handle, path)
        names = parquet.schema_arrow.names
        check_columns(names, path, required)
        present = [column for column in columns if column in names]
        groups = list(range(part.start, parquet.num_row_groups if part.stop is None else part.stop))
        batches = parquet.iter_batches(batch_size=batch_size, columns=present, row_groups=groups)
        number = sum(parquet.metadata.row_group(group).num_rows for group in range(part.start))
        yield from _parquet_records(batches, columns, path, number)


def open_parquet(handle: Any, path: str) -> Any:
    """A pyarrow ParquetFile over an open input, or an error naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as exc:
        raise LmforgeError(f"{path} is not a readable Parquet file ({exc}); replace it with a readable copy") from None


def _parquet_records(batches: Iterator[Any], columns: list[str], path: str, number: int) -> Iterator[Row]:
    import pyarrow as pa

    fix = "replace it with a readable copy"
    while True:
        try:  # a corrupt page shows only when it is read
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            raise LmforgeError(f"{path} is corrupt after row {number} ({exc}); {fix}") from None
        for record in batch.to_pylist():
            number += 1
            yield Row(f"{path} row {number}", {column: record.get(column) for column in columns}, False)


def _csv_rows(
    part: FileRange, columns: list[str], required: Mapping[str, str], counters: Counter, batch_size: int
) -> Iterator[Row]:
    """The columns of a CSV file with a header row, streamed row by row."""
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

    path = part.path
    with _open_text_bytes(part.location) as file:
        rows = csv.reader(lines(file))
        header = _next_csv_row(rows, path) or []
        check_columns(header, path, required)
        index = {column: header.index(column) for column in columns if column in header}
        replaced_since_row[0] = False
        while True:
            start = rows.line_num + 1  # a quoted field may span lines: name the first
            row = _next_csv_row(rows, path)
            if row is None:
                return
            replaced, replaced_since_row[0] = replaced_since_row[0], False
            values = {column: None for column in columns}
            values.update({column: row[i] for column, i in index.items() if i < len(row)})
            yield Row(f"{path}:{start}", values, replaced)


def _next_csv_row(rows: Any, path: str) -> list[str] | None:
    try:
        return next(rows, None)
    except csv.Error as exc:  # e.g. a bare CR (old Mac line ends) inside an unquoted field
        raise LmforgeError(
            f"{path}:{rows.line_num}: not valid CSV ({exc}); save the file with \\n or \\r\\n line ends "
            "and quote fields that contain them"
        ) from None


TableReader = Callable[[FileRange, list[str], Mapping[str, str], Counter, int], Iterator[Row]]
TABLE_READERS: dict[str, TableReader] = {".jsonl": _jsonl_rows, ".parquet": _parquet_rows, ".csv": _csv_rows}
