"""The tokenize pipeline: stream cleaned documents, route each to its split by id, encode
in batches with the Rust tokenizer (already multithreaded), pack and
shard (the shard files and their manifest: shards.py).

`Packer` packs documents end to end (EOS after each) into rows of seq_len+1 ids; the shard
files and manifest they go into are lmforge.data.tokens.shards.
"""

from __future__ import annotations

from dataclasses import asdict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow.compute as pc
from tokenizers import Tokenizer

from lmforge.data.documents import split_of
from lmforge.data.partitions import iter_part_arrow
from lmforge.data.tokens.mixture import copies
from lmforge.data.tokens.shards import ShardInfo, ShardWriter, SplitSummary, token_dtype
from lmforge.data.tokens.tokenizer import encode_plain
from lmforge.core.errors import LmforgeError
from lmforge.core.params import TokenizerParams

SPLITS = ("train", "val")


class Packer:
    """Concatenates documents with EOS after each, cutting full rows of seq_len+1 ids.

    Rows do not overlap: every token lands in exactly one row, except the final tail
    shorter than a row, which is counted in `tail_tokens`, so nothing is silently lost.
    """

    def __init__(self, seq_len: int, eos_id: int, dtype: np.dtype) -> None:
        self.row_len = seq_len + 1
        self.eos_id = eos_id
        self.dtype = dtype
        self.documents = 0
        self.tokens = 0  # encoded tokens including one EOS per document
        self._carry = np.empty(0, dtype=dtype)

    def add(self, documents_ids: list[list[int]]) -> np.ndarray:
        """Rows completed by these documents, shape (n, seq_len+1)."""
        flat: list[int] = []
        eos = self.eos_id
        for ids in documents_ids:
            flat += ids
            flat.append(eos)
        self.documents += len(documents_ids)
        self.tokens += len(flat)
        stream = np.concatenate([self._carry, np.asarray(flat, dtype=self.dtype)])
        n_rows = len(stream) // self.row_len
        cut = n_rows * self.row_len
        self._carry = stream[cut:].copy()
        return stream[:cut].reshape(n_rows, self.row_len)

    @property
    def tail_tokens(self) -> int:
        return len(self._carry)


class _Batch(NamedTuple):
    texts: list[str]
    is_val: np.ndarray
    size: int  # UTF-8 bytes of the texts
    ids: list[str]
    sources: list[str] | None  # read only when mixing named sources


def _batches(path: Path, batch_size: int, val_fraction: float, sources: bool = False) -> Iterator[_Batch]:
    """The documents of a part batch by batch, in file order; the split comes from each id."""
    for batch in iter_part_arrow(path, batch_size, "clean", ["id", "text", "source"] if sources else ["id", "text"]):
        ids, texts = batch.column(0).to_pylist(), batch.column(1)
        is_val = np.fromiter((split_of(doc_id, val_fraction) == "val" for doc_id in ids), bool, len(ids))
        yield _Batch(texts.to_pylist(), is_val, int(pc.sum(pc.binary_length(texts)).as_py() or 0), ids,
                     batch.column(2).to_pylist() if sources else None)


def _encode_ahead(batches: Iterator[_Batch], tokenizer: Tokenizer) -> Iterator[tuple[list[list[int]], _Batch]]:
    """Encode batch k+1 in a thread while the caller packs and writes batch k.

    The Rust encoder releases the GIL, so reading Parquet and packing (Python) overlap with
    encoding instead of leaving the encoder's cores idle. Both splits of a batch are encoded
    in one call: small separate calls for the val documents parallelize poorly.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in batches:
            future = pool.submit(encode_plain, tokenizer, batch.texts)
            if pending is not None:
                yield pending[0].result(), pending[1]
            pending = (future, batch)
        if pending is not None:
            yield pending[0].result(), pending[1]


def encode_part(
    path: Path, tokenizer: Tokenizer, params: TokenizerParams, val_fraction: float, root: Path, prefix: str = "",
    factors: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Encode and pack the documents of one Parquet file (a partition) into shards under `root`,
    named `<split>/<prefix><split>-NNNNN.arrow`. A partition packs alone: its last row's tail of
    fewer than seq_len+1 tokens is dropped and counted. Returns {"bytes_in", "splits": summaries}.

    With `factors` (named sources: source -> factor, lmforge.data.tokens.mixture) the train split
    packs each document as many times as its source's factor gives, and the val split packs each
    source apart (`<split>/<prefix><source>-val-NNNNN.arrow`), so a val row holds one source; the
    result adds "sources": {"train": name -> counts, "val": name -> summary}."""
    if factors is not None:
        return _encode_mixed(path, tokenizer, params, val_fraction, root, prefix, factors)
    eos_id = tokenizer.token_to_id(params.eos_token)
    dtype = token_dtype(tokenizer.get_vocab_size())
    packers = {split: Packer(params.seq_len, eos_id, dtype) for split in SPLITS}
    writers = {split: ShardWriter(root, split, params.seq_len, dtype, params.shard_rows, prefix) for split in SPLITS}
    bytes_in = 0
    for ids, batch in _encode_ahead(_batches(path, params.encode_batch_size, val_fraction), tokenizer):
        for split, in_split in (("train", ~batch.is_val), ("val", batch.is_val)):
            writers[split].add(packers[split].add([doc for doc, keep in zip(ids, in_split) if keep]))
        bytes_in += batch.size
    splits = {split: _summary(packers[split], writers[split].close()) for split in SPLITS}
    return {"bytes_in": bytes_in, "splits": splits}


def _summary(packer: Packer, shards: list[ShardInfo]) -> dict[str, Any]:
    return asdict(SplitSummary(
        documents=packer.documents,
        tokens_encoded=packer.tokens,
        tail_tokens_dropped=packer.tail_tokens,
        rows=sum(s.rows for s in shards),
        tokens=sum(s.tokens for s in shards),
        shards=shards,
    ))


def _encode_mixed(path: Path, tokenizer: Tokenizer, params: TokenizerParams, val_fraction: float, root: Path,
                  prefix: str, factors: Mapping[str, float]) -> dict[str, Any]:
    """encode_part of named sources. A batch's repeats are packed epoch by epoch (every document it
    keeps once, then those kept twice, ...), so a document's copies land in different rows; the
    trainer shuffles rows anyway."""
    eos_id = tokenizer.token_to_id(params.eos_token)
    dtype = token_dtype(tokenizer.get_vocab_size())
    train = Packer(params.seq_len, eos_id, dtype)
    train_writer = ShardWriter(root, "train", params.seq_len, dtype, params.shard_rows, prefix)
    val = {name: Packer(params.seq_len, eos_id, dtype) for name in factors}
    val_writers = {name: ShardWriter(root, "val", params.seq_len, dtype, params.shard_rows, f"{prefix}{name}-")
                   for name in factors}
    counts = {name: dict.fromkeys(("tokens", "documents", "unique_tokens", "unique_documents"), 0) for name in factors}
    bytes_in = 0
    for encoded, batch in _encode_ahead(_batches(path, params.encode_batch_size, val_fraction, True), tokenizer):
        _check_sources(batch.sources, factors, path)
        times = [0 if is_val else copies(doc_id, factors[source])
                 for doc_id, source, is_val in zip(batch.ids, batch.sources, batch.is_val)]
        for epoch in range(max(times, default=0)):
            train_writer.add(train.add([doc for doc, n in zip(encoded, times) if n > epoch]))
        for doc, source, n, is_val in zip(encoded, batch.sources, times, batch.is_val):
            if is_val:
                continue
            tally = counts[source]
            tally["unique_documents"] += 1
            tally["unique_tokens"] += len(doc) + 1  # with its EOS, as the packer counts
            tally["documents"] += n
            tally["tokens"] += n * (len(doc) + 1)
        for name in factors:
            val_writers[name].add(val[name].add([doc for doc, source, is_val in zip(encoded, batch.sources, batch.is_val)
                                                 if is_val and source == name]))
        bytes_in += batch.size
    per_source = {name: _summary(val[name], val_writers[name].close()) for name in factors}
    merged_val = asdict(SplitSummary(
        **{key: sum(summary[key] for summary in per_source.values())
           for key in ("documents", "tokens_encoded", "tail_tokens_dropped", "rows", "tokens")},
        shards=[ShardInfo(**shard) for summary in per_source.values() for shard in summary["shards"]]))
    return {"bytes_in": bytes_in, "splits": {"train": _summary(train, train_writer.close()), "val": merged_val},
            "sources": {"train": counts, "val": per_source}}


def count_train_tokens(path: Path, tokenizer: Tokenizer, params: TokenizerParams, val_fraction: float,
                       names: list[str]) -> dict[str, int]:
    """Each named source's train tokens (EOS included) in one partition: what the mixture's factors
    are computed from, before anything is packed."""
    tokens = dict.fromkeys(names, 0)
    for encoded, batch in _encode_ahead(_batches(path, params.encode_batch_size, val_fraction, True), tokenizer):
        _check_sources(batch.sources, tokens, path)
        for doc, source, is_val in zip(encoded, batch.sources, batch.is_val):
            if not is_val:
                tokens[source] += len(doc) + 1
    return tokens


def _check_sources(sources: list[str], known: Mapping[str, Any], path: Path) -> None:
    unknown = sorted(set(sources) - set(known))
    if unknown:
        raise LmforgeError(f"{path} holds documents of sources {unknown} that mix.weights does not weigh (it has "
                           f"{sorted(known)}): data/clean is from other data.sources; run `dvc repro` so ingest and "
                           "clean read the sources params.yaml lists")


def merge_parts(parts: list[dict[str, Any]], seq_len: int) -> dict[str, SplitSummary]:
    """The splits of the whole dataset from its partitions' summaries, shards in partition order;
    a split without one full row is an error that says what to change."""
    merged = {}
    for split in SPLITS:
        summaries = [part["splits"][split] for part in parts]
        total = SplitSummary(
            **{key: sum(s[key] for s in summaries) for key in ("documents", "tokens_encoded", "tail_tokens_dropped", "rows", "tokens")},
            shards=[ShardInfo(**shard) for s in summaries for shard in s["shards"]],
        )
        if not total.shards:
            hint = "raise data.val_fraction" if split == "val" else "add documents"
            raise LmforgeError(
                f"the {split} split has {total.tokens_encoded} tokens from {total.documents} documents, fewer than "
                f"one row of tokenizer.seq_len+1 = {seq_len + 1} in any partition; {hint}, raise data.partition_mb "
                "or lower tokenizer.seq_len"
            )
        merged[split] = total
    return merged


def shard_stats(splits: dict[str, SplitSummary], vocab_size: int, bytes_in: int, seconds: float) -> dict[str, Any]:
    """The stage's figures over all partitions (stats.json)."""
    tokens = sum(summary.tokens_encoded for summary in splits.values())
    return {
        "vocab_size": vocab_size,
        "dtype": token_dtype(vocab_size).name,
        "encode_seconds": round(seconds, 3),
        "bytes_in": bytes_in,
        "mb_per_s": bytes_in / 1e6 / seconds if seconds else 0.0,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "bytes_per_token": bytes_in / tokens if tokens else 0.0,
        **{
            f"{split}.{key}": value
            for split, summary in splits.items()
            for key, value in vars(summary).items()
            if key != "shards"
        },
        **{f"{split}.shards": len(summary.shards) for split, summary in splits.items()},
    }
