"""Where `ingest` gets documents: the built-in corpus, files (.txt, .jsonl, .parquet, .csv; local
paths or fsspec URLs such as s3://bucket/dir/*.jsonl) or a Hugging Face Hub dataset, all streamed as
`Document`s with uniform counters; a file can be read in slices (`FileRange`), the unit of ingest's
partitions. Where files are and how they are matched: `locations`; how each format is read: `readers`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lmforge.data.documents import Document, check_columns, make_document
from lmforge.data.sources.locations import input_size, open_input
from lmforge.data.sources.readers import TABLE_READERS, FileRange, iter_table_rows, row_text, txt_texts, without_surrogates
from lmforge.core.errors import LmforgeError
from lmforge.core.params import DataParams, HfSourceParams

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
TEXT_FIELD_HINT = ("set data.text_field (a named source's own text_field in data.sources) in params.yaml to the "
                   "column that holds the text")


def counted(documents: Iterable[Document], counters: Counter) -> Iterator[Document]:
    """Count documents and bytes in one place, and make every text valid UTF-8."""
    for doc in documents:
        text, replaced = without_surrogates(doc["text"])
        if replaced:  # lone surrogates cannot be written to Arrow
            metadata = {key: value for key, value in doc.items() if key not in ("id", "text", "source")}
            doc = make_document(text, doc["source"], **metadata)
            counters["decode_replaced_docs"] += 1
        counters["documents"] += 1
        counters["bytes"] += len(text.encode("utf-8"))
        yield doc


# ---------------------------------------------------------------- local files


def pools(data: DataParams) -> list[tuple[str, DataParams]]:
    """(the documents' `source`, the params its files are read with) of each pool of files, in the
    order they are read: data.files alone ("files"), or each of data.sources under its own name with
    its own files, text_field and txt_separator."""
    if data.source != "sources":
        return [("files", data)]
    return [(source.name, data.model_copy(update={"source": "files", "sources": [], "files": source.files,
                                                  "text_field": source.text_field,
                                                  "txt_separator": source.txt_separator}))
            for source in data.sources]


def file_range_documents(part: FileRange, params: DataParams, counters: Counter,
                         source: str = "files") -> Iterator[Document]:
    """The documents of one slice of a file, each with `source` as its source. The file-level checks
    run in every slice, but only the first slice counts and warns, so a file split in n slices is
    counted once."""
    path, first = part.path, part.start == 0
    if input_size(part.location) == 0:
        if first:
            counters["empty_files"] += 1
            logger.warning("skipping %s: empty file", path)
        return
    reader = _reader_for(path)
    # Parquet is binary by design; its reader checks the format itself.
    if Path(path).suffix.lower() != ".parquet" and _looks_binary(part.location):
        if first:
            counters["binary_files_skipped"] += 1
            logger.warning("skipping %s: binary file (NUL byte in its first 8 KiB)", path)
        return
    counters["files_read"] += first
    for text, replaced in reader(part, params, counters):
        counters["decode_replaced_docs"] += replaced
        yield make_document(text, source, name=path)


def splittable(path: str, params: DataParams) -> bool:
    """Whether a large file can be read in byte slices: .jsonl (lines) and .txt with a separator.
    A .csv row may span lines (quoted newlines), so a .csv file is one slice; .parquet is sliced by
    row groups instead.

    A separator that can overlap itself on visible characters ("===" in "=====") is not sliced: where
    a run of it is cut, a slice cannot know how reading from the file's start would have paired it.
    Overlaps of whitespace ("\n\n" in "\n\n\n") are sliced: documents are stripped, so they come out
    the same (only the count of empty pieces may differ by where the cuts fall)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return True
    separator = params.txt_separator
    if suffix != ".txt" or separator is None:
        return False
    return not any(separator[:k] == separator[-k:] and separator[:k].strip() for k in range(1, len(separator)))


# A reader yields (text, whether invalid UTF-8 was replaced) for each document of a file slice.
Reader = Callable[[FileRange, DataParams, Counter], Iterator[tuple[str, bool]]]


def check_supported(path: str) -> None:
    """An error naming the file unless ingest can read its type."""
    _reader_for(path)


def _reader_for(path: str) -> Reader:
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        return txt_texts
    if suffix in TABLE_READERS:
        return _table_texts
    raise LmforgeError(
        f"{path}: unsupported file type; data.files (and data.sources' files) may only match "
        f"{', '.join(SUPPORTED_EXTENSIONS)} files"
    )


def _looks_binary(location: str) -> bool:
    with open_input(location) as file:
        return b"\0" in file.read(BINARY_SNIFF_BYTES)


def _table_texts(part: FileRange, params: DataParams, counters: Counter) -> Iterator[tuple[str, bool]]:
    """The text field of each row of a slice of a .jsonl, .parquet or .csv file."""
    field = params.text_field
    for row in iter_table_rows(part, [field], {field: TEXT_FIELD_HINT}, counters, params.batch_size):
        text = row_text(row.values[field])
        if text is None:
            counters["rows_missing_text"] += 1
        else:
            yield text, row.replaced


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
