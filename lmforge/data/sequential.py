"""The data stages' work in one sequential pass in this process: every document of a source in
order, and one documents file encoded into shards. Tests and benchmarks hold the engine's
partitioned work to these; no stage imports this module, so editing it reruns no stage.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from lmforge.core.params import DataParams, TokenizerParams
from lmforge.data.documents import Document
from lmforge.data.sources.builtin import TOPICS_PACKAGE, iter_builtin_files, module_name, stdlib_dir, stdlib_source_files
from lmforge.data.sources.configured import (COUNTER_KEYS, check_supported, counted, file_range_documents,
                                             iter_hf_documents, pools)
from lmforge.data.sources.locations import input_location, resolve_files
from lmforge.data.sources.readers import FileRange
from lmforge.data.tokens.pack import encode_part, merge_parts, shard_stats
from lmforge.data.tokens.shards import token_dtype, write_shards_manifest


def iter_documents(params: DataParams, counters: Counter) -> Iterator[Document]:
    """Stream the documents of `params.source`, counting into `counters` (keys: COUNTER_KEYS): what
    ingest's partitions hold, in their global order.

    Text is never dropped for bad encoding: invalid UTF-8 is replaced by U+FFFD and the
    document counted in "decode_replaced_docs".
    """
    counters.update({key: 0 for key in COUNTER_KEYS})
    if params.source == "builtin":
        documents = iter_builtin_documents(counters)
    elif params.source in ("files", "sources"):
        documents = iter_file_documents(params, counters)
    else:
        documents = iter_hf_documents(params.hf, params.text_field, counters)
    yield from counted(documents, counters)


def iter_file_documents(params: DataParams, counters: Counter) -> Iterator[Document]:
    """Documents of every file the `data.files` globs match, in sorted path order (of each of
    data.sources in turn, under its name)."""
    read = [(name, pool, resolve_files(pool.files)) for name, pool in pools(params)]
    for _, _, paths in read:  # checked before reading any, so a typo fails in seconds, not hours
        for path in paths:
            check_supported(path)
    for name, pool, paths in read:
        for path in paths:
            yield from file_range_documents(FileRange(path, input_location(path)), pool, counters, name)


def iter_builtin_documents(counters: Counter, packages: Collection[str] | None = None) -> Iterator[Document]:
    """Every non-empty docstring of the stdlib (module, class, function and method), then every
    `pydoc_data.topics` entry: the built-in corpus as one partition. `packages` keeps only those
    top-level packages ("json", "pydoc_topics", ...); None keeps everything. Counts "files_read"
    and "parse_errors"."""
    root = stdlib_dir()
    files = [path.relative_to(root).as_posix() for path in stdlib_source_files(root)
             if packages is None or module_name(path.relative_to(root)).split(".")[0] in packages]
    return iter_builtin_files(files, packages is None or TOPICS_PACKAGE in packages, counters)


def encode_to_shards(
    path: Path,
    tokenizer: Tokenizer,
    tokenizer_sha256: str,
    params: TokenizerParams,
    val_fraction: float,
    root: Path,
) -> dict[str, Any]:
    """One documents file as a dataset of one partition: its shards and manifest under `root`
    (the stage runs encode_part per partition on the engine)."""
    start = time.perf_counter()
    part = encode_part(path, tokenizer, params, val_fraction, root)
    seconds = time.perf_counter() - start
    splits = merge_parts([part], params.seq_len)
    vocab_size = tokenizer.get_vocab_size()
    write_shards_manifest(root, tokenizer_sha256=tokenizer_sha256, vocab_size=vocab_size,
                          eos_id=tokenizer.token_to_id(params.eos_token), seq_len=params.seq_len,
                          dtype=token_dtype(vocab_size), splits=splits)
    return shard_stats(splits, vocab_size, part["bytes_in"], seconds)
