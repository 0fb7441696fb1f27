"""Tokenize as tasks over the clean partitions: sample (per partition) -> train the BPE (one task)
-> encode and pack (per partition), each with a completion marker in the staging directory.

The BPE trains on a bounded sample of the train split: the documents whose id hash falls under
`rate` (tokenizer.train_sample_mb over the train bytes of the corpus), in global order, so the
sample, hence the tokenizer, do not depend on the number of workers, and its cost not on the corpus.
When the sample is the whole train split (rate 1.0: a corpus under train_sample_mb), the BPE task
reads the train documents from the clean partitions itself, in the same order: a sample would be a
copy of them, written and read back for nothing.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.data import partitions
from lmforge.data.documents import split_of
from lmforge.core.io import atomic_path
from lmforge.data.job import DataJob, Engine, JobResult
from lmforge.data.markers import completed, mark_completed, task_key
from lmforge.data.tokens.mixture import mixture_csv, normalised, realised, source_factors
from lmforge.data.tokens.pack import count_train_tokens, encode_part, merge_parts, shard_stats
from lmforge.data.partitions import iter_part_arrow
from lmforge.data.tokens.shards import token_dtype, write_shards_manifest
from lmforge.data.tokens.tokenizer import load_tokenizer, save_tokenizer, tokenizer_threads, train_tokenizer
from lmforge.core.digests import file_sha256
from lmforge.data.engine import fault_point, throughput_postfix
from lmforge.core.params import TokenizerParams

log = logging.getLogger(__name__)

STAGE = "tokenize"
# The figures `dvc metrics show` and `dvc exp show` put side by side; stats.json keeps the rest.
COMPARED = ("train.tokens", "bytes_per_token")
# Bumped when a task's output changes for the same inputs and params: older markers are stale.
TOKENIZE_TASK_VERSION = 1
SAMPLES = "sample"
SHARDS = "shards"
TOKENIZER = "tokenizer.json"
MIXTURE = "mixture.csv"  # beside tokenizer.json: the realised mixture of the train split, for `dvc plots`
ONE_POOL = "all"  # the mixture's name for the documents of a single-pool source (builtin, files, hf)


@dataclass(frozen=True)
class TokenizeJob(DataJob):
    """The BPE (`tokenizer_dir`/tokenizer.json, beside stats.json and metrics.json) and the shards of
    every partition of `clean` (`output`, manifest last), as a data job (lmforge.data.job)."""

    params: TokenizerParams
    val_fraction: float
    clean: Path
    output: Path
    reports: Path
    staging: Path
    # mix.weights: named sources mixed in the train split, each source's val apart; empty: one pool.
    weights: Mapping[str, float] = field(default_factory=dict)
    # The BPE trainer and the encoder use every core of the process they run in, so two workers are
    # not worth their start: on 2 cores (50 MB, docs/benchmarks.md) the driver took 19.0 s where
    # the embedded cluster took 21.7 s (~1.1 s to start it, ~3 CPU-s of imports in its workers).
    # With more workers, processes should encode faster than one process's threads, whose packing is
    # serial (0.7 s of 2.6 s per 13 MB partition): estimated from that share, not measured (2 cores).
    min_workers: int = 3

    @property
    def compared(self) -> tuple[str, ...]:
        return COMPARED + (("mixture",) if self.weights else ())

    def plan(self) -> tuple[list[Part], float]:
        """The clean partitions and the share of their train documents the BPE samples (a clear
        error before the engine starts if clean has not run)."""
        corpus_bytes = partitions.read_parts_manifest(self.clean, "clean")["bytes"]
        parts = [part_of(i, path) for i, path in enumerate(partitions.part_paths(self.clean, "clean"))]
        return parts, sample_rate(self.params.train_sample_mb, corpus_bytes, self.val_fraction)

    def partitions(self, plan: tuple[list[Part], float]) -> int:
        return len(plan[0])

    def run(self, plan: tuple[list[Part], float], engine: Engine) -> JobResult:
        (parts, rate), params, val_fraction, staging = plan, self.params, self.val_fraction, self.staging.resolve()
        dumped = params.model_dump(mode="json")
        started = time.perf_counter()
        whole = rate >= 1.0
        if whole:  # the whole train split: read where it is
            train_task = TrainTask([], [whole_split_key(part, val_fraction) for part in parts], dumped,
                                   params.encode_batch_size, str(staging), tuple(part.path for part in parts), val_fraction)
        else:
            sample_tasks = [SampleTask(part, rate, val_fraction, params.encode_batch_size, str(staging))
                            for part in parts]
            samples = engine.map(sample_part, sample_tasks, desc="tokenize: sample", postfix=throughput_postfix(started))
            train_task = TrainTask([part.name for part in parts], [sample_key(task) for task in sample_tasks], dumped,
                                   params.encode_batch_size, str(staging))
        (trained,) = engine.map(train_on_sample, [train_task], desc="tokenize: train BPE")
        sampled = trained if whole else {key: sum(sample[key] for sample in samples) for key in ("documents", "bytes")}
        started = time.perf_counter()
        workers = engine.workers
        # Idle workers otherwise, or the driver alone (0): let each encoder use every core.
        spread = len(parts) < workers or workers == 0
        factors = None
        if self.weights:  # the sources' train tokens first: the factors need the whole corpus's counts
            counted = engine.map(count_partition,
                                 [CountTask(part, trained["sha256"], dumped, val_fraction, list(self.weights),
                                            str(staging), spread) for part in parts],
                                 desc="tokenize: count sources", postfix=throughput_postfix(started))
            factors = source_factors({name: sum(part[name] for part in counted) for name in self.weights},
                                     self.weights)
        encoded = engine.map(encode_partition,
                             [EncodeTask(part, trained["sha256"], dumped, val_fraction, str(staging), spread, factors)
                              for part in parts],
                             desc="tokenize", postfix=throughput_postfix(started))
        encode_seconds = time.perf_counter() - started
        resumed = sum(result.pop("resumed") for result in encoded)
        if resumed:
            log.info("resumed: %d of %d partitions were encoded by a killed run and were not read again",
                     resumed, len(encoded))
        tokenizer = load_tokenizer(staging / TOKENIZER)
        vocab_size = tokenizer.get_vocab_size()
        splits = merge_parts(encoded, params.seq_len)  # before any output changes: an empty split is an error
        stats = {
            "tokenizer_train_seconds": trained["seconds"],
            "train_sample_mb": params.train_sample_mb,
            "sample_rate": rate,
            "sample_documents": sampled["documents"],
            "sample_bytes": sampled["bytes"],
            **shard_stats(splits, vocab_size, sum(part["bytes_in"] for part in encoded), encode_seconds),
            "partitions": len(parts),
            "workers": workers,
            "parts": [{key: part[key] for key in ("name", "documents", "bytes", "seconds")} for part in encoded],
        }
        sources = None
        if factors is not None:
            sources = mixed_sources(encoded, self.weights, factors)
            stats["mixture"] = sources["mixture"]
            stats["val_sources"] = {name: {key: val[key] for key in ("documents", "rows", "tokens")}
                                    for name, val in sources["val"].items()}
        else:  # the one pool: weight 1, every document once
            train = splits["train"]
            stats["mixture"] = realised({ONE_POOL: 1.0}, {ONE_POOL: {
                "tokens": train.tokens_encoded, "documents": train.documents,
                "unique_tokens": train.tokens_encoded, "unique_documents": train.documents}})
        with atomic_path(staging / MIXTURE) as tmp:
            tmp.write_text(mixture_csv(stats["mixture"]), encoding="utf-8")
        manifest = functools.partial(write_shards_manifest, tokenizer_sha256=trained["sha256"], vocab_size=vocab_size,
                                     eos_id=tokenizer.token_to_id(params.eos_token), seq_len=params.seq_len,
                                     dtype=token_dtype(vocab_size), splits=splits, sources=sources)
        shards = [staging / SHARDS / shard["file"] for part in encoded for split in part["splits"].values()
                  for shard in split["shards"]]
        return JobResult(stats, shards, manifest, under=staging / SHARDS,
                         beside={staging / TOKENIZER: self.reports / TOKENIZER,
                                 staging / MIXTURE: self.reports / MIXTURE})


def mixed_sources(encoded: list[dict[str, Any]], weights: Mapping[str, float],
                  factors: Mapping[str, float]) -> dict[str, Any]:
    """The shards manifest's `sources`: the asked weights and factors, the realised mixture of the
    train split, and each source's val shards (what a per-source val loss reads)."""
    keys = ("tokens", "documents", "unique_tokens", "unique_documents")
    train = {name: {key: sum(part["sources"]["train"][name][key] for part in encoded) for key in keys}
             for name in weights}
    val = {name: {key: sum(part["sources"]["val"][name][key] for part in encoded)
                  for key in ("documents", "tokens_encoded", "tail_tokens_dropped", "rows", "tokens")}
           for name in weights}
    for name in weights:
        val[name]["shards"] = [shard["file"] for part in encoded for shard in part["sources"]["val"][name]["shards"]]
    return {"weights": normalised(weights), "factors": {name: round(f, 6) for name, f in factors.items()},
            "mixture": realised(weights, train), "val": val}


class Part(NamedTuple):
    """One clean partition, as a task sees it."""

    index: int
    name: str  # part-NNNNN.parquet
    path: str  # absolute: the workers of an external cluster have their own working directory
    identity: str  # size and modification time: a changed part makes its markers stale


def part_of(index: int, path: Path) -> Part:
    stat = path.stat()
    return Part(index, path.name, str(path.resolve()), f"{stat.st_size}:{stat.st_mtime_ns}")


def sample_rate(train_sample_mb: float, corpus_bytes: int, val_fraction: float) -> float:
    """The share of train documents to sample for about `train_sample_mb` MB (1.0: all of them)."""
    train_bytes = corpus_bytes * (1 - val_fraction)
    return min(1.0, train_sample_mb * 1e6 / train_bytes) if train_bytes > 0 else 1.0


def in_sample(doc_id: str, rate: float) -> bool:
    # Hex digits 8-16 of the id: independent of split_of, which reads digits 0-8.
    return rate >= 1.0 or int(doc_id[8:16], 16) / 0x1_0000_0000 < rate


class SampleTask(NamedTuple):
    part: Part
    rate: float
    val_fraction: float
    batch_size: int
    staging: str


def sample_key(task: SampleTask) -> str:
    return task_key(TOKENIZE_TASK_VERSION, "sample", task.part, task.rate, task.val_fraction)


def sample_part(task: SampleTask) -> dict[str, Any]:
    """The sampled train texts of one partition -> <staging>/sample/<part name> (column `text`)."""
    staging, name = Path(task.staging), f"sample-{task.part.name}"
    output = staging / SAMPLES / task.part.name
    key = sample_key(task)
    if (done := completed(staging, name, key, [output])) is not None:
        return done
    documents = size = 0
    schema = pa.schema([("text", pa.large_string())])
    with atomic_path(output) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for texts in _sampled_batches(task.part.path, task.rate, task.val_fraction, task.batch_size):
            if texts:
                writer.write_batch(pa.record_batch([pa.array(texts, pa.large_string())], schema=schema))
                documents += len(texts)
                size += sum(len(text.encode("utf-8")) for text in texts)
    result = {"name": task.part.name, "documents": documents, "bytes": size}
    mark_completed(staging, name, key, result)
    return result


class TrainTask(NamedTuple):
    samples: list[str]  # sample file names in global order (none: the whole train split of `parts`)
    sample_keys: list[str]
    params: dict[str, Any]  # TokenizerParams as JSON
    batch_size: int
    staging: str
    parts: tuple[str, ...] = ()  # the clean partitions in global order, when the sample is their whole train split
    val_fraction: float = 0.0


def whole_split_key(part: Part, val_fraction: float) -> str:
    """What the BPE read of `part` when it read its whole train split (a changed part: retrained)."""
    return task_key(TOKENIZE_TASK_VERSION, "train-split", part, val_fraction)


def train_on_sample(task: TrainTask) -> dict[str, Any]:
    """The BPE from the samples in order, or from the partitions' train documents in order ->
    <staging>/tokenizer.json; returns its sha256 (and, read whole, the documents and bytes)."""
    staging = Path(task.staging)
    output = staging / TOKENIZER
    key = task_key(TOKENIZE_TASK_VERSION, "train", task.sample_keys, task.params)
    if (done := completed(staging, "tokenizer", key, [output])) is not None:
        return done
    started = time.perf_counter()
    read = {"documents": 0, "bytes": 0}
    texts = (_train_split(task.parts, task.val_fraction, task.batch_size, read) if task.parts
             else _sample_texts(staging, task.samples, task.batch_size))
    with tokenizer_threads(spread=True):  # the one task running: every core is the trainer's
        tokenizer = train_tokenizer(texts, TokenizerParams(**task.params))
    save_tokenizer(tokenizer, output)
    result = {"sha256": file_sha256(output), "seconds": round(time.perf_counter() - started, 3),
              **(read if task.parts else {})}
    mark_completed(staging, "tokenizer", key, result)
    return result


def _sampled_batches(path: str, rate: float, val_fraction: float, batch_size: int) -> Iterator[list[str]]:
    """The texts of a clean partition's train documents in the BPE's sample, batch by batch, in file order."""
    for batch in iter_part_arrow(path, batch_size, "clean", columns=["id", "text"]):
        ids, texts = batch.column("id").to_pylist(), batch.column("text").to_pylist()
        yield [text for doc_id, text in zip(ids, texts)
               if split_of(doc_id, val_fraction) == "train" and in_sample(doc_id, rate)]


def _train_split(parts: tuple[str, ...], val_fraction: float, batch_size: int, read: dict[str, int]):
    """The train documents' texts of `parts` in order (the sample at rate 1.0), counted into `read`."""
    for path in parts:
        for train in _sampled_batches(path, 1.0, val_fraction, batch_size):
            read["documents"] += len(train)
            read["bytes"] += sum(len(text.encode("utf-8")) for text in train)
            yield from train


def _sample_texts(staging: Path, names: list[str], batch_size: int):
    for name in names:
        for batch in pq.ParquetFile(staging / SAMPLES / name).iter_batches(batch_size=batch_size):
            yield from batch.column(0).to_pylist()


class CountTask(NamedTuple):
    part: Part
    tokenizer_sha256: str
    params: dict[str, Any]  # TokenizerParams as JSON
    val_fraction: float
    names: list[str]  # the named sources, mix.weights' order
    staging: str
    spread: bool


def count_partition(task: CountTask) -> dict[str, int]:
    """One partition's train tokens per named source (a second encoding pass: the price of exact
    token shares), with its completion marker."""
    staging, name = Path(task.staging), f"count-{task.part.name}"
    key = task_key(TOKENIZE_TASK_VERSION, "count", task.part, task.tokenizer_sha256, task.params, task.val_fraction,
                   task.names)
    if (done := completed(staging, name, key)) is not None:
        return done
    tokenizer = load_tokenizer(staging / TOKENIZER)
    with tokenizer_threads(task.spread):
        result = count_train_tokens(Path(task.part.path), tokenizer, TokenizerParams(**task.params),
                                    task.val_fraction, task.names)
    mark_completed(staging, name, key, result)
    return result


class EncodeTask(NamedTuple):
    part: Part
    tokenizer_sha256: str
    params: dict[str, Any]  # TokenizerParams as JSON
    val_fraction: float
    staging: str
    spread: bool  # fewer partitions than workers: the tokenizer may use every core (tokenizer_threads)
    factors: dict[str, float] | None = None  # named sources: each one's copies (lmforge.data.tokens.mixture)


def encode_partition(task: EncodeTask) -> dict[str, Any]:
    """One partition's shards -> <staging>/shards/<split>/part-NNNNN-<split>-NNNNN.arrow."""
    staging, name = Path(task.staging), f"encode-{task.part.name}"
    root = staging / SHARDS
    # The one pool's key as before (its markers stay valid); named sources' adds their factors.
    mixed = () if task.factors is None else (task.factors,)
    key = task_key(TOKENIZE_TASK_VERSION, "encode", task.part, task.tokenizer_sha256, task.params, task.val_fraction,
                   *mixed)
    done = completed(staging, name, key)
    if done is not None and all((root / shard["file"]).is_file()
                                for split in done["splits"].values() for shard in split["shards"]):
        return {**done, "resumed": True}
    started = time.perf_counter()
    prefix = task.part.name.removesuffix(".parquet") + "-"
    for stale in root.glob(f"*/{prefix}*.arrow"):  # of an attempt killed mid-way: its shard count may differ
        stale.unlink()
    tokenizer = load_tokenizer(staging / TOKENIZER)
    with tokenizer_threads(task.spread):
        part = encode_part(Path(task.part.path), tokenizer, TokenizerParams(**task.params), task.val_fraction,
                           root, prefix, task.factors)
    fault_point(STAGE, task.part.index)
    result = {"name": task.part.name, **part,
              "documents": sum(split["documents"] for split in part["splits"].values()),
              "bytes": part["bytes_in"], "seconds": round(time.perf_counter() - started, 3)}
    mark_completed(staging, name, key, result)
    return {**result, "resumed": False}
