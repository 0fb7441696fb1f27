"""The shard format: rows of seq_len+1 token ids in Arrow IPC files, written atomically with
a manifest, and read back memory-mapped (zero copy) after verifying manifest and checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from lmforge.core.io import write_json
from lmforge.data.tokens.tokenizer import load_tokenizer
from lmforge.core.digests import file_sha256, written_md5
from lmforge.core.errors import LmforgeError, naming_full_disk

MANIFEST_NAME = "manifest.json"
SHARDS_MANIFEST_FORMAT = 1
COLUMN = "input_ids"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (halves disk and memory), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_schema(seq_len: int, dtype: np.dtype) -> pa.Schema:
    return pa.schema([(COLUMN, pa.list_(pa.from_numpy_dtype(dtype), seq_len + 1))])


@dataclass
class ShardInfo:
    file: str  # relative to the shards directory
    rows: int
    tokens: int
    bytes: int
    sha256: str


@dataclass
class SplitSummary:
    documents: int = 0
    tokens_encoded: int = 0
    tail_tokens_dropped: int = 0
    rows: int = 0
    tokens: int = 0
    shards: list[ShardInfo] = field(default_factory=list)


class ShardWriter:
    """Writes rows into shards of `shard_rows` rows each: temp name, then rename."""

    def __init__(self, root: Path, split: str, seq_len: int, dtype: np.dtype, shard_rows: int, prefix: str = "") -> None:
        self.root = root
        self.split = split
        self.prefix = prefix  # a partition's shards: "part-00003-"
        self.schema = shard_schema(seq_len, dtype)
        self.row_len = seq_len + 1
        self.shard_rows = shard_rows
        self.shards: list[ShardInfo] = []
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        (root / split).mkdir(parents=True, exist_ok=True)

    def add(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        self._pending.append(rows)
        self._pending_rows += len(rows)
        while self._pending_rows >= self.shard_rows:
            block = np.concatenate(self._pending)
            self._write_shard(block[: self.shard_rows])
            rest = block[self.shard_rows :]
            self._pending = [rest] if len(rest) else []
            self._pending_rows = len(rest)

    def close(self) -> list[ShardInfo]:
        if self._pending_rows:
            self._write_shard(np.concatenate(self._pending))
        self._pending, self._pending_rows = [], 0
        return self.shards

    def _write_shard(self, rows: np.ndarray) -> None:
        relative = f"{self.split}/{self.prefix}{self.split}-{len(self.shards):05d}.arrow"
        path = self.root / relative
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        values = pa.array(rows.reshape(-1), type=self.schema.field(COLUMN).type.value_type)
        column = pa.FixedSizeListArray.from_arrays(values, self.row_len)
        # Built in memory (shard_rows rows: megabytes), so its sha256 (the manifest's) and md5 (the output
        # tags') come from the bytes written, not from reading the file back.
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, self.schema) as writer:
            writer.write_batch(pa.record_batch([column], schema=self.schema))
        data = sink.getvalue()
        try:
            with naming_full_disk(path):
                with open(tmp, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        written_md5(path, hashlib.md5(data).hexdigest())
        self.shards.append(ShardInfo(relative, len(rows), int(rows.size), data.size, hashlib.sha256(data).hexdigest()))


def write_shards_manifest(
    root: Path,
    *,
    tokenizer_sha256: str,
    vocab_size: int,
    eos_id: int,
    seq_len: int,
    dtype: np.dtype,
    splits: dict[str, SplitSummary],
    sources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Written last: a shard set without a manifest is an unfinished one. `sources` (named sources
    only): the mixture and each source's val shards (lmforge.data.tokenize_job.mixed_sources)."""
    manifest = {
        "format_version": SHARDS_MANIFEST_FORMAT,
        "tokenizer_sha256": tokenizer_sha256,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "seq_len": seq_len,
        "row_length": seq_len + 1,
        "dtype": dtype.name,
        "column": COLUMN,
        "splits": {name: asdict(summary) for name, summary in splits.items()},
    }
    if sources is not None:  # the one pool's manifest stays as it was
        manifest["sources"] = sources
    write_json(root / MANIFEST_NAME, manifest)
    return manifest


def read_shards_manifest(root: str | Path) -> dict[str, Any]:
    """manifest.json of the shards in `root`, every field the reader and the trainers use checked."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise LmforgeError(
            f"{path} not found: the shards in {root} are missing or unfinished; run `dvc repro tokenize`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{path} is corrupt ({exc}); rerun `dvc repro -f tokenize`") from None
    if not isinstance(manifest, dict):
        raise LmforgeError(f"{path} is not a JSON object; rerun `dvc repro -f tokenize`")
    if manifest.get("format_version") != SHARDS_MANIFEST_FORMAT:
        raise LmforgeError(f"{path} has format {manifest.get('format_version')}, expected {SHARDS_MANIFEST_FORMAT}; rerun `dvc repro -f tokenize`")
    problem = _manifest_problem(manifest)
    if problem:
        raise LmforgeError(f"{path}: {problem}; rerun `dvc repro -f tokenize`")
    return manifest


# The fields the reader and the training stages rely on, and their JSON types.
_FIELDS = {"tokenizer_sha256": str, "vocab_size": int, "eos_id": int, "seq_len": int, "row_length": int,
           "dtype": str, "column": str, "splits": dict}
_KIND = {str: "a string", int: "an integer", dict: "an object"}


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with a manifest's fields, or None: each must agree with the others, since the
    reader trusts them (the model's vocabulary, the rows' length, the EOS that splits documents)."""
    for key, kind in _FIELDS.items():
        if key not in manifest:
            return f"{key} is missing"
        value = manifest[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{key} is {value!r}, not {_KIND[kind]}"
    vocab, seq_len = manifest["vocab_size"], manifest["seq_len"]
    if vocab < 1 or seq_len < 1:
        return f"vocab_size {vocab} and seq_len {seq_len} must be positive"
    if manifest["row_length"] != seq_len + 1:
        return f"row_length {manifest['row_length']} is not seq_len {seq_len} + 1"
    if not 0 <= manifest["eos_id"] < vocab:
        return f"eos_id {manifest['eos_id']} is not an id of its vocabulary of {vocab}"
    if manifest["dtype"] not in ("uint16", "uint32") or np.iinfo(manifest["dtype"]).max < vocab - 1:
        return f"dtype {manifest['dtype']!r} cannot hold the ids of a vocabulary of {vocab} (uint16 or uint32)"
    if manifest["column"] != COLUMN:
        return f"column {manifest['column']!r} is not {COLUMN!r}"
    return None


def _tokenizer_problem(manifest: dict[str, Any], tokenizer_path: str | Path, eos_token: str | None) -> str | None:
    """Where the manifest disagrees with the tokenizer it names (same file by hash, so the manifest is wrong)."""
    tokenizer = load_tokenizer(tokenizer_path)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if manifest["vocab_size"] != vocab:
        return f"vocab_size {manifest['vocab_size']} is not the {vocab} ids of {tokenizer_path}"
    if eos_token is not None:
        eos = tokenizer.token_to_id(eos_token)
        if eos is None:
            return f"its tokenizer {tokenizer_path} has no {eos_token!r} (tokenizer.eos_token in params.yaml)"
        if manifest["eos_id"] != eos:
            return f"eos_id {manifest['eos_id']} is not {eos}, the id of {eos_token!r} in {tokenizer_path}"
    return None


_SHARD_FIELDS = {"file": str, "rows": int, "bytes": int, "sha256": str}


def _split_problem(summary: Any) -> str | None:
    """What is wrong with the shape of a split's entry (its counts are checked against its shards)."""
    if not isinstance(summary, dict) or not isinstance(summary.get("shards"), list):
        return "has no list of shards"
    for index, shard in enumerate(summary["shards"]):
        if not isinstance(shard, dict) or any(not isinstance(shard.get(key), kind) for key, kind in _SHARD_FIELDS.items()):
            return f"shard {index} lacks one of {sorted(_SHARD_FIELDS)}"
    return None


def val_sources(root: str | Path) -> list[str]:
    """The named sources whose val rows the shards in `root` keep apart (none: one pool)."""
    return list(read_shards_manifest(root).get("sources", {}).get("val", {}))


def _source_summary(manifest: dict[str, Any], summary: dict[str, Any], split: str, source: str,
                    manifest_path: Path) -> dict[str, Any]:
    """The entry of `split` narrowed to one named source's shards."""
    sources = manifest.get("sources", {}).get(split) if split == "val" else None
    if not isinstance(sources, dict) or source not in sources:
        raise LmforgeError(f"{manifest_path} keeps no {split} rows of source {source!r} apart (named sources: "
                           f"{sorted(sources or {})}); per-source rows exist for the val split of data.sources")
    files = set(sources[source].get("shards", []))
    return {"rows": sources[source].get("rows"), "tokens": sources[source].get("tokens"),
            "shards": [shard for shard in summary["shards"] if shard["file"] in files]}


def rows_view(column: pa.FixedSizeListArray, dtype: np.dtype) -> np.ndarray:
    """A fixed-size-list column of `dtype` ids as a (rows, list_size) array viewing the memory-mapped
    file, not a copy. Read from its buffer by hand: Array.flatten, to_numpy and to_pandas_dtype import
    pyarrow.compute and pandas, about 0.15 CPU-s of every process that reads shards. Nulls have no
    place in a shard (ValueError); the caller checks the child's type is `dtype`."""
    values, width = column.values, column.type.list_size  # values: the whole child, before any slicing
    if column.null_count or values.null_count:
        raise ValueError(f"{column.null_count + values.null_count} null entries")
    start = (values.offset + column.offset * width) * dtype.itemsize
    flat = np.frombuffer(values.buffers()[1], dtype=dtype, count=len(column) * width, offset=start)
    return flat.reshape(-1, width)


class ShardReader:
    """Random access to the rows of one split, memory-mapped: rows are views, not copies.

    `verify="checksum"` hashes every shard against the manifest at open (a full read);
    `verify="size"` only checks sizes, for a quick open of large, trusted shard sets.
    With `tokenizer_path` (and `eos_token`), the manifest must describe that tokenizer: same file,
    same vocabulary size, same EOS id. With `source` (named sources, split "val"), the rows of that
    source alone (`val_sources` lists them).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        tokenizer_path: str | Path | None = None,
        seq_len: int | None = None,
        eos_token: str | None = None,
        verify: Literal["checksum", "size"] = "checksum",
        source: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.manifest = read_shards_manifest(self.root)
        manifest_path = self.root / MANIFEST_NAME
        if split not in self.manifest["splits"]:
            raise LmforgeError(f"{manifest_path} has no split {split!r} (it has {sorted(self.manifest['splits'])})")
        if tokenizer_path is not None and file_sha256(tokenizer_path) != self.manifest["tokenizer_sha256"]:
            raise LmforgeError(
                f"shards in {self.root} were made with another tokenizer than {tokenizer_path}; "
                "rerun `dvc repro tokenize` so shards and tokenizer match"
            )
        if tokenizer_path is not None and (problem := _tokenizer_problem(self.manifest, tokenizer_path, eos_token)):
            raise LmforgeError(f"{manifest_path}: {problem}; rerun `dvc repro -f tokenize`")
        if seq_len is not None and seq_len != self.manifest["seq_len"]:
            raise LmforgeError(
                f"shards in {self.root} have seq_len {self.manifest['seq_len']}, not {seq_len}; "
                "rerun `dvc repro tokenize` or set tokenizer.seq_len to match"
            )
        self.seq_len: int = self.manifest["seq_len"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.eos_id: int = self.manifest["eos_id"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self._blocks: list[np.ndarray] = []
        self._sources: list[Any] = []  # keep the memory maps alive as long as the views
        summary = self.manifest["splits"][split]
        problem = _split_problem(summary)
        if problem:
            raise LmforgeError(f"{manifest_path}: split {split!r} {problem}; rerun `dvc repro -f tokenize`")
        if source is not None:
            summary = _source_summary(self.manifest, summary, split, source, manifest_path)
        for shard in summary["shards"]:
            self._blocks.extend(self._open_shard(shard, verify))
        rows = sum(len(block) for block in self._blocks)
        if summary.get("rows") != rows or summary.get("tokens") != rows * (self.seq_len + 1):
            raise LmforgeError(
                f"{manifest_path}: split {split!r} has {summary.get('rows')} rows and {summary.get('tokens')} tokens, "
                f"its shards {rows} rows of {self.seq_len + 1} ids; rerun `dvc repro -f tokenize`"
            )
        self._ends = np.cumsum([len(block) for block in self._blocks], dtype=np.int64)

    def _open_shard(self, shard: dict[str, Any], verify: str) -> list[np.ndarray]:
        path = self.root / shard["file"]
        fix = "rerun `dvc repro -f tokenize` to rebuild the shards"
        mismatch = f"shard {path} does not match its manifest entry (rows or dtype); {fix}"
        if not path.is_file():
            raise LmforgeError(f"shard {path} listed in the manifest is missing; {fix}")
        if path.stat().st_size != shard["bytes"]:
            raise LmforgeError(f"shard {path} has {path.stat().st_size} bytes, manifest says {shard['bytes']}; {fix}")
        if verify == "checksum" and file_sha256(path) != shard["sha256"]:
            raise LmforgeError(f"shard {path} fails its checksum (corrupt or modified); {fix}")
        try:
            source = pa.memory_map(str(path), "r")
            reader = pa.ipc.open_file(source)
            columns = [reader.get_batch(i).column(0) for i in range(reader.num_record_batches)]
            if any(not pa.types.is_fixed_size_list(c.type) or c.values.type != pa.from_numpy_dtype(self.dtype)
                   for c in columns):
                raise LmforgeError(mismatch)
            blocks = [rows_view(column, self.dtype) for column in columns]
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise LmforgeError(f"shard {path} is not a readable Arrow file ({exc}); {fix}") from None
        if any(b.shape[1] != self.seq_len + 1 for b in blocks):
            raise LmforgeError(f"shard {path} holds rows of {blocks[0].shape[1]} ids, {MANIFEST_NAME} says "
                               f"{self.seq_len + 1} (seq_len + 1); {fix}")
        if sum(len(b) for b in blocks) != shard["rows"]:
            raise LmforgeError(mismatch)
        self._sources.append(source)
        return blocks

    def blocks(self) -> list[np.ndarray]:
        """The split as (rows, seq_len+1) memory-mapped blocks, for whole-split statistics."""
        return list(self._blocks)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def num_tokens(self) -> int:
        return len(self) * (self.seq_len + 1)

    def __getitem__(self, index: int) -> np.ndarray:
        """Row `index` (seq_len+1 ids), a read-only view into the memory map."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows of split {self.split!r}")
        block = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[block - 1]) if block else 0
        return self._blocks[block][index - start]

    def rows(self, indices: list[int] | np.ndarray) -> np.ndarray:
        """A copied (n, seq_len+1) int64 batch, ready for torch.from_numpy."""
        return np.stack([self[int(i)] for i in indices]).astype(np.int64)
