"""Where `ingest` gets documents: the built-in corpus, local files (.txt, .jsonl, .parquet,
.csv) or a Hugging Face Hub dataset, all streamed as `Document`s with uniform counters.
"""

from __future__ import annotations

import codecs
import csv
import fnmatch
import glob
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

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
# More matches than this is a glob gone wrong (e.g. `**` from the root): stop instead of
# listing for hours, and say so.
MAX_GLOB_MATCHES = 1_000_000
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
        text, replaced = _without_surrogates(doc["text"])
        if replaced:  # lone surrogates cannot be written to Arrow
            metadata = {key: value for key, value in doc.items() if key not in ("id", "text", "source")}
            doc = make_document(text, doc["source"], **metadata)
            counters["decode_replaced_docs"] += 1
        counters["documents"] += 1
        counters["bytes"] += len(text.encode("utf-8"))
        yield doc


# ---------------------------------------------------------------- local files


def iter_file_documents(params: DataParams, counters: Counter) -> Iterator[Document]:
    """Documents of every file the `data.files` globs match, in sorted path order."""
    paths = resolve_files(params.files)
    for path in paths:  # checked before reading any, so a typo fails in seconds, not hours
        _reader_for(path)
    for path in paths:
        yield from _file_documents(path, params, counters)


def resolve_files(patterns: list[str]) -> list[str]:
    """The files the globs match (** recursive, relative to cwd), sorted, each real file once."""
    found: dict[str, str] = {}  # real path -> the path as the glob spelled it
    for pattern in patterns:
        matches = []
        for path in _glob_files(pattern):
            if len(matches) == MAX_GLOB_MATCHES:
                raise LmforgeError(
                    f"data.files: {pattern!r} matches more than {MAX_GLOB_MATCHES:,} files; "
                    "narrow the glob in params.yaml"
                )
            matches.append(path)
        if not matches:
            raise LmforgeError(
                f"data.files: {pattern!r} matches no files (relative to {os.getcwd()}); "
                "fix data.files in params.yaml"
            )
        # Sorted: the spelling kept for a file seen twice must not depend on directory order.
        for path in sorted(matches):
            found.setdefault(os.path.realpath(path), path)
    return sorted(found.values())


def _glob_files(pattern: str) -> Iterator[str]:
    """The files `pattern` matches, lazily, spelled as glob spells them. glob's own `**` follows
    a symlink to a parent directory round and round, so `**` patterns are walked here."""
    parts = pattern.split("/")
    if "**" not in parts:
        yield from (path for path in glob.iglob(pattern) if os.path.isfile(path))
        return
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = "/".join(parts[:fixed]) or ("/" if fixed else "")  # fixed == 1 and "": an absolute "/**/..."
    rest = parts[fixed:]
    enter_hidden = any(part.startswith(".") for part in rest)  # else, as glob, skip .git, .venv...
    for prefix, name in _walk_files(base or ".", enter_hidden):
        if _path_matches([*prefix, name], rest):
            path = os.path.join(base, *prefix, name)
            if os.path.isfile(path):  # not a broken symlink
                yield path


def _walk_files(root: str, enter_hidden: bool) -> Iterator[tuple[list[str], str]]:
    """(directories below `root`, file name) of every file under `root`, in sorted order.
    Symlinked directories are followed, except into a directory that is already on the path
    from `root`: that is a cycle, which would otherwise never end."""
    chains: dict[str, frozenset[tuple[int, int]]] = {}  # directory -> it and its ancestors
    for directory, dirnames, filenames in os.walk(root, followlinks=True):
        stat = os.stat(directory)
        identity = (stat.st_dev, stat.st_ino)
        ancestors = chains.pop(directory, frozenset())
        if identity in ancestors:
            dirnames[:] = []
            continue
        # In place: os.walk descends into these, in this order (a deterministic walk).
        dirnames[:] = sorted(name for name in dirnames if enter_hidden or not name.startswith("."))
        chains.update((os.path.join(directory, name), ancestors | {identity}) for name in dirnames)
        relative = os.path.relpath(directory, root)
        prefix = [] if relative == "." else relative.split(os.sep)
        for name in sorted(filenames):
            yield prefix, name


def _path_matches(parts: list[str], pattern: list[str]) -> bool:
    """Whether path components match glob components; `**` stands for any number of them."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        # As glob: `**` does not enter hidden directories.
        return any(
            _path_matches(parts[skip:], rest)
            for skip in range(len(parts) + 1)
            if not any(part.startswith(".") for part in parts[:skip])
        )
    return bool(parts) and _name_matches(parts[0], head) and _path_matches(parts[1:], rest)


def _name_matches(name: str, pattern: str) -> bool:
    # As glob: a wildcard never matches a leading dot; the pattern must spell it.
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def _file_documents(path: str, params: DataParams, counters: Counter) -> Iterator[Document]:
    if os.path.getsize(path) == 0:
        counters["empty_files"] += 1
        logger.warning("skipping %s: empty file", path)
        return
    reader = _reader_for(path)
    # Parquet is binary by design; its reader checks the format itself.
    if Path(path).suffix.lower() != ".parquet" and _looks_binary(path):
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
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        return _txt_texts
    if suffix in TABLE_READERS:
        return _table_texts
    raise LmforgeError(
        f"{path}: unsupported file type; data.files may only match "
        f"{', '.join(SUPPORTED_EXTENSIONS)} files"
    )


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


def _without_surrogates(value: Any) -> tuple[Any, bool]:
    """A string without lone surrogates (JSON "\\ud800" escapes: Arrow and the tokenizer refuse
    them), each replaced by "?", and whether any were; other values as they are."""
    if not isinstance(value, str):
        return value, False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8"), True
    return value, False


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


def _table_texts(path: str, params: DataParams, counters: Counter) -> Iterator[tuple[str, bool]]:
    """The text field of each row of a .jsonl, .parquet or .csv file."""
    field = params.text_field
    for row in iter_table_rows(path, [field], {field: TEXT_FIELD_HINT}, counters, params.batch_size):
        text = row_text(row.values[field])
        if text is None:
            counters["rows_missing_text"] += 1
        else:
            yield text, row.replaced


def row_text(value: Any) -> str | None:
    """A row's text field, or None when it is missing, not a string (a list, a number...) or
    blank: such a row is skipped and counted, never stringified."""
    return value if isinstance(value, str) and value.strip() else None


# ---------------------------------------------------------------- tables (.jsonl, .parquet, .csv)
# One reader per format, shared by ingest (the text field) and fine-tuning (text, label, prompt,
# response), so both treat bad input alike: invalid UTF-8 replaced and flagged, lines that are not
# JSON objects skipped and counted in "bad_json_lines", a file that is not Parquet or CSV at all,
# or lacks a required column, an error naming the file.


class Row(NamedTuple):
    where: str  # "file:line" (.jsonl, .csv) or "file row n" (.parquet), for messages
    values: dict[str, Any]  # every requested column; None where the row has no value
    replaced: bool  # invalid UTF-8 replaced by U+FFFD (lone surrogates by "?")


def iter_table_rows(
    path: str, columns: list[str], required: Mapping[str, str], counters: Counter, batch_size: int = 2000
) -> Iterator[Row]:
    """The `columns` of each row of a .jsonl, .parquet or .csv file, streamed.

    `required`: column -> hint, for the columns a .parquet/.csv header must have (the error names
    the file, its columns and the hint); a .jsonl row without them gives None, like a null value.
    """
    reader = TABLE_READERS.get(Path(path).suffix.lower())
    if reader is None:
        raise LmforgeError(f"{path}: not a table; use a {', '.join(TABLE_READERS)} file")
    yield from reader(path, columns, required, counters, batch_size)


def _jsonl_rows(
    path: str, columns: list[str], required: Mapping[str, str], counters: Counter, batch_size: int
) -> Iterator[Row]:
    """One JSON object per line, read line by line; blank lines are ignored."""
    bad_lines = 0
    with _open_text_bytes(path) as file:
        for number, raw in enumerate(file, start=1):
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
                values[column], fixed = _without_surrogates(row.get(column))
                replaced |= fixed
            yield Row(f"{path}:{number}", values, replaced)
    if bad_lines > MAX_WARNINGS_PER_FILE:
        logger.warning("%s: %d lines skipped in all as not JSON objects", path, bad_lines)


def _parquet_rows(
    path: str, columns: list[str], required: Mapping[str, str], counters: Counter, batch_size: int
) -> Iterator[Row]:
    """The columns, one record batch at a time (Arrow strings are valid UTF-8)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fix = "replace it with a readable copy"
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise LmforgeError(f"{path} is not a readable Parquet file ({exc}); {fix}") from None
    names = parquet.schema_arrow.names
    check_columns(names, path, required)
    present = [column for column in columns if column in names]
    batches = parquet.iter_batches(batch_size=batch_size, columns=present)
    number = 0
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
    path: str, columns: list[str], required: Mapping[str, str], counters: Counter, batch_size: int
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

    with _open_text_bytes(path) as file:
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


TableReader = Callable[[str, list[str], Mapping[str, str], Counter, int], Iterator[Row]]
TABLE_READERS: dict[str, TableReader] = {".jsonl": _jsonl_rows, ".parquet": _parquet_rows, ".csv": _csv_rows}


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
        text = row_text(row.get(text_field))
        if text is None:
            counters["rows_missing_text"] += 1
            continue
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
