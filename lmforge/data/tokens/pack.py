"""The tokenize pipeline: stream cleaned documents, route each to its split by id, encode
in batches with the Rust tokenizer (already multithreaded), pack and
shard (the shard files and their manifest: shards.py).

`Packer` packs documents end to end (EOS after each) into rows of seq_len+1 ids; the shard
files and manifest they go into are lmforge.data.tokens.shards.
"""

from __future__ import annotations

from dataclasses import asdict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from tokenizers import Tokenizer

from lmforge.data.documents import split_of
from lmforge.data.partitions import iter_part_arrow
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


def _batches(path: Path, batch_size: int, val_fraction: float) -> Iterator[tuple[list[str], np.ndarray, int]]:
    """(texts, is_val mask, UTF-8 bytes) per batch, in file order; the split comes from each id."""
    for batch in iter_part_arrow(path, batch_size, "clean", ["id", "text"]):
        ids, texts = batch.column(0).to_pylist(), batch.column(1)
        is_val = np.fromiter((split_of(doc_id, val_fraction) == "val" for doc_id in ids), bool, len(ids))
        yield texts.to_pylist(), is_val, int(pc.sum(pc.binary_length(texts)).as_py() or 0)


def _encode_ahead(
    batches: Iterator[tuple[list[str], np.ndarray, int]], tokenizer: Tokenizer
) -> Iterator[tuple[list[list[int]], np.ndarray, int]]:
    """Encode batch k+1 in a thread while the caller packs and writes batch k.

    The Rust encoder releases the GIL, so reading Parquet and packing (Python) overlap with
    encoding instead of leaving the encoder's cores idle. Both splits of a batch are encoded
    in one call: small separate calls for the val documents parallelize poorly.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for texts, is_val, size in batches:
            future = pool.submit(encode_plain, tokenizer, texts)
            if pending is not None:
                yield pending[0].result(), pending[1], pending[2]
            pending = (future, is_val, size)
        if pending is not None:
            yield pending[0].result(), pending[1], pending[2]


def encode_part(
    path: Path, tokenizer: Tokenizer, params: TokenizerParams, val_fraction: float, root: Path, prefix: str = ""
) -> dict[str, Any]:
    """Encode and pack the documents of one Parquet file (a partition) into shards under `root`,
    named `<split>/<prefix><split>-NNNNN.arrow`. A partition packs alone: its last row's tail of
    fewer than seq_len+1 tokens is dropped and counted. Returns {"bytes_in", "splits": summaries}."""
    eos_id = tokenizer.token_to_id(params.eos_token)
    dtype = token_dtype(tokenizer.get_vocab_size())
    packers = {split: Packer(params.seq_len, eos_id, dtype) for split in SPLITS}
    writers = {split: ShardWriter(root, split, params.seq_len, dtype, params.shard_rows, prefix) for split in SPLITS}
    bytes_in = 0
    for ids, is_val, size in _encode_ahead(_batches(path, params.encode_batch_size, val_fraction), tokenizer):
        for split, in_split in (("train", ~is_val), ("val", is_val)):
            writers[split].add(packers[split].add([doc for doc, keep in zip(ids, in_split) if keep]))
        bytes_in += size
    splits = {}
    for split in SPLITS:
        packer, shards = packers[split], writers[split].close()
        splits[split] = asdict(SplitSummary(
            documents=packer.documents,
            tokens_encoded=packer.tokens,
            tail_tokens_dropped=packer.tail_tokens,
            rows=sum(s.rows for s in shards),
            tokens=sum(s.tokens for s in shards),
            shards=shards,
        ))
    return {"bytes_in": bytes_in, "splits": splits}


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
