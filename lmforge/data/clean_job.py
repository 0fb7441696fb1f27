"""The clean stage as tasks over partitions, datatrove's MinHash shape: map, dedup per band, map.

1. `map_part` (per raw partition): normalize and filter (lmforge.data.quality.clean.Cleaner); write the
   survivors and, beside them, their small key columns (exact key, LSH band keys, signature).
2. `dedup_task` (per band, and once for the exact key): group one key column of the whole
   corpus; write the pairs of duplicates it finds. Then `resolve` walks all pairs in global
   order (a single task: its memory is the number of duplicate pairs) and writes, per
   partition, the rows dedup drops.
3. `write_part` (per partition): the survivors of both, as data/clean's part of the same index,
   with the partition's stats and rejected samples; `CleanJob.run` sums them (the data-job
   driver, lmforge.data.job, publishes them).

Memory of a task: one partition's batch at a time (1, 3), or one band's keys of the corpus,
16 bytes a document, plus the signatures of its candidates (2). Every task writes into the
staging directory atomically and leaves a completion marker keyed by its inputs and the clean
params, so a rerun of a killed stage skips what was finished.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmforge.data.quality.clean import DEDUP_STEPS, SAMPLE_TEXT_CHARS, Cleaner, Filtered, count_dedup, merge_samples, merge_stats, sample_row
from lmforge.data.quality.dedup import (CanonicalTexts, band_buckets, band_keys, exact_duplicates, exact_keys, lsh_bands,
                                near_duplicates, signatures, verified_pairs)
from lmforge.core.io import atomic_path, write_jsonl
from lmforge.data.documents import DocumentWriter
from lmforge.data.job import DataJob, Engine, JobResult
from lmforge.data.markers import completed, mark_completed, task_key
from lmforge.data.partitions import iter_part_arrow, iter_part_batches, part_name, part_paths, write_parts_manifest
from lmforge.core.digests import file_sha256
from lmforge.data.engine import fault_point
from lmforge.core.params import CleanParams

# Bumped when a staged file's layout or a marker's meaning changes: older markers are then stale.
CLEAN_TASK_VERSION = 1
ROW_BITS = 32  # gid = partition << ROW_BITS | row among the partition's filter survivors
EXACT, NEAR = 1, 2  # codes of the drops file, in the order the steps run

STAGE = "clean"
# The figures `dvc metrics show` and `dvc exp show` put side by side; stats.json keeps the rest.
COMPARED = ("documents_in", "documents_out", "kept_byte_fraction")
REJECTED_SAMPLES = "rejected_samples.jsonl"  # beside the parts: the first documents each step dropped
log = logging.getLogger("lmforge.clean")


@dataclass(frozen=True)
class Plan:
    """What every task needs (picklable: it travels to the workers)."""

    params: CleanParams
    staging: Path

    @property
    def bands(self) -> int:
        return lsh_bands(self.params.minhash_threshold, self.params.minhash_num_perm)

    def path(self, kind: str, name: str) -> Path:
        return self.staging / kind / name

    def params_key(self) -> dict[str, Any]:
        return self.params.model_dump(mode="json")



# --- 1. Per partition: filters and keys. ---

def _keys_schema(params: CleanParams, bands: int) -> pa.Schema:
    fields = [("row", pa.int64()), ("raw_bytes", pa.int64()), ("clean_bytes", pa.int64())]
    if params.exact_dedup:
        fields += [("exact_high", pa.uint64()), ("exact_low", pa.uint32())]
    if params.near_dedup:
        fields += [(f"band_{band:03d}", pa.uint64()) for band in range(bands)]
        fields += [("signature", pa.list_(pa.uint32(), params.minhash_num_perm))]
    return pa.schema(fields)


def _keys_batch(plan: Plan, schema: pa.Schema, filtered: Filtered) -> pa.RecordBatch:
    params = plan.params
    columns: dict[str, pa.Array] = {"row": pa.array(filtered.rows), "raw_bytes": pa.array(filtered.raw_bytes),
                                    "clean_bytes": pa.array(filtered.clean_bytes)}
    canonical = CanonicalTexts([doc["text"] for doc in filtered.docs])
    if params.exact_dedup:
        high, low = exact_keys(canonical)
        columns |= {"exact_high": pa.array(high), "exact_low": pa.array(low)}
    if params.near_dedup:
        sigs = signatures(canonical, params.minhash_num_perm, params.minhash_shingle_size, params.minhash_seed)
        keys = band_keys(sigs, plan.bands)
        columns |= {f"band_{band:03d}": pa.array(keys[:, band]) for band in range(plan.bands)}
        columns["signature"] = pa.FixedSizeListArray.from_arrays(pa.array(sigs.ravel()), params.minhash_num_perm)
    return pa.RecordBatch.from_pydict(columns, schema=schema)


def map_part(task: tuple[Plan, int, str]) -> dict[str, Any]:
    """Filter raw partition `index`; stage its survivors and their keys. Returns its counts."""
    plan, index, raw_path = task
    name = part_name(index)
    filtered_path, keys_path = plan.path("filtered", name), plan.path("keys", name)
    sha256 = file_sha256(raw_path)
    key = task_key("map", plan.params_key(), sha256, CLEAN_TASK_VERSION)
    if (done := completed(plan.staging, f"map-{name}", key, [filtered_path, keys_path])) is not None:
        return {**done, "resumed": True}
    fault_point(STAGE, index)
    start = time.perf_counter()
    cleaner = Cleaner(plan.params)
    schema = _keys_schema(plan.params, plan.bands)
    with DocumentWriter(filtered_path) as writer, atomic_path(keys_path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as keys:
            for batch in iter_part_arrow(raw_path, plan.params.batch_size, "ingest"):
                filtered = cleaner.clean_batch(batch)
                writer.write(filtered.docs)
                if filtered.docs:
                    keys.write_batch(_keys_batch(plan, schema, filtered))
    result = {"name": name, "sha256": sha256, "survivors": writer.documents, "stats": cleaner.stats.to_dict(),
              "samples": cleaner.samples, "seconds": round(time.perf_counter() - start, 3)}
    mark_completed(plan.staging, f"map-{name}", key, result)
    return result


# --- 2. Per band and for the exact key: pairs of duplicates; then the walk in global order. ---

def _column(plan: Plan, parts: Sequence[int], column: str) -> np.ndarray:
    arrays = [pq.read_table(plan.path("keys", part_name(part)), columns=[column]).column(column).to_numpy()
              for part in parts]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint64)


def _gids(parts: Sequence[int], survivors: Sequence[int]) -> np.ndarray:
    return np.concatenate([(np.int64(part) << ROW_BITS) + np.arange(count, dtype=np.int64)
                           for part, count in zip(parts, survivors)] or [np.zeros(0, dtype=np.int64)])


def _signatures(plan: Plan, gids: np.ndarray) -> np.ndarray:
    """Signatures of the (sorted) `gids`, read partition by partition."""
    num_perm = plan.params.minhash_num_perm
    out = np.zeros((len(gids), num_perm), dtype=np.uint32)
    parts = gids >> ROW_BITS
    for part in np.unique(parts).tolist():
        where = np.flatnonzero(parts == part)
        column = pq.read_table(plan.path("keys", part_name(part)), columns=["signature"]).column("signature")
        matrix = column.combine_chunks().flatten().to_numpy().reshape(-1, num_perm)
        out[where] = matrix[gids[where] & ((1 << ROW_BITS) - 1)]
    return out


def dedup_task(task: tuple[Plan, str, list[int], list[int], str]) -> dict[str, Any]:
    """`exact` or `band-NNN` over the whole corpus: writes pairs/<name>.npy, (earlier, later) gids."""
    plan, name, parts, survivors, run_key = task
    out = plan.path("pairs", f"{name}.npy")
    key = task_key(name, run_key)
    if (done := completed(plan.staging, name, key, [out])) is not None:
        return done
    start = time.perf_counter()
    gids = _gids(parts, survivors)
    exact = (_column(plan, parts, "exact_high"), _column(plan, parts, "exact_low")) if plan.params.exact_dedup else None
    if name == "exact":
        later = exact_duplicates(exact[0], exact[1], gids)
        pairs = np.stack([np.full(len(later), -1, dtype=np.int64), later], axis=1)  # the first copy is not needed
    else:
        buckets = band_buckets(_column(plan, parts, f"band_{int(name.split('-')[1]):03d}"), gids, exact)
        members = np.unique(np.concatenate(buckets)) if buckets else np.zeros(0, dtype=np.int64)
        sigs = _signatures(plan, members)
        pairs = verified_pairs(buckets, lambda bucket: sigs[np.searchsorted(members, bucket)],
                               plan.params.minhash_threshold)
    with atomic_path(out) as tmp, tmp.open("wb") as handle:
        np.save(handle, pairs)
    result = {"name": name, "pairs": len(pairs), "seconds": round(time.perf_counter() - start, 3)}
    mark_completed(plan.staging, name, key, result)
    return result


def resolve(task: tuple[Plan, list[str], list[int], str]) -> dict[str, Any]:
    """The rows each partition drops: exact duplicates, then near duplicates of a kept document."""
    plan, names, parts, run_key = task
    outputs = [plan.path("drops", f"{part_name(part)}.npy") for part in parts]
    key = task_key("resolve", run_key)
    if (done := completed(plan.staging, "resolve", key, outputs)) is not None:
        return done
    pairs = {name: np.load(plan.path("pairs", f"{name}.npy")) for name in names}
    exact = pairs.pop("exact", np.zeros((0, 2), dtype=np.int64))[:, 1]
    near = near_duplicates(np.concatenate(list(pairs.values()) or [np.zeros((0, 2), dtype=np.int64)]))
    drops = np.concatenate([np.stack([exact, np.full(len(exact), EXACT)], axis=1),
                            np.stack([near, np.full(len(near), NEAR)], axis=1)])
    drops = drops[np.argsort(drops[:, 0], kind="stable")]
    owner = drops[:, 0] >> ROW_BITS
    for part, path in zip(parts, outputs):
        mine = drops[owner == part]
        with atomic_path(path) as tmp, tmp.open("wb") as handle:
            np.save(handle, np.stack([mine[:, 0] & ((1 << ROW_BITS) - 1), mine[:, 1]], axis=1))
    result = {"exact": len(exact), "near": len(near)}
    mark_completed(plan.staging, "resolve", key, result)
    return result


# --- 3. Per partition: the survivors, counted. ---

def write_part(task: tuple[Plan, int, str, dict[str, Any], str]) -> dict[str, Any]:
    """Stage data/clean's part `index`: the filters' survivors that dedup keeps, with its stats."""
    plan, index, raw_path, mapped, run_key = task
    name = part_name(index)
    out = plan.path("out", name)
    key = task_key("write", run_key, index)
    if (done := completed(plan.staging, f"write-{name}", key, [out])) is not None:
        return done
    start = time.perf_counter()
    keys = pq.read_table(plan.path("keys", name), columns=["row", "raw_bytes", "clean_bytes"])
    rows = keys.column("row").to_numpy()
    dropped = {step: np.zeros(len(rows), dtype=bool) for step in DEDUP_STEPS if getattr(plan.params, step)}
    drops_path = plan.path("drops", f"{name}.npy")
    if dropped:
        drops = np.load(drops_path)
        for step, code in (("exact_dedup", EXACT), ("near_dedup", NEAR)):
            if step in dropped:
                dropped[step][drops[drops[:, 1] == code, 0]] = True
    stats = count_dedup(mapped["stats"], dropped, keys.column("raw_bytes").to_numpy(), keys.column("clean_bytes").to_numpy())
    samples = list(mapped["samples"]) + _dedup_samples(plan, name, raw_path, rows, dropped)
    kept = ~np.logical_or.reduce(list(dropped.values())) if dropped else np.ones(len(rows), dtype=bool)
    with DocumentWriter(out) as writer:
        offset = 0
        for docs in iter_part_batches(plan.path("filtered", name), plan.params.batch_size, "clean"):
            writer.write([doc for doc, keep in zip(docs, kept[offset : offset + len(docs)].tolist()) if keep])
            offset += len(docs)
    result = {"name": name, "documents": writer.documents, "bytes": writer.bytes, "stats": stats, "samples": samples,
              "seconds": round(time.perf_counter() - start, 3)}
    mark_completed(plan.staging, f"write-{name}", key, result)
    return result


def _dedup_samples(plan: Plan, name: str, raw_path: str, rows: np.ndarray,
                   dropped: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Sample rows of the first documents each dedup step dropped here (raw text, like the filters')."""
    chosen = [(step, int(survivor)) for step, mask in dropped.items()
              for survivor in np.flatnonzero(mask)[: plan.params.rejected_samples_per_reason].tolist()]
    if not chosen:
        return []
    survivors = [survivor for _, survivor in chosen]
    docs = pq.read_table(plan.path("filtered", name), columns=["id", "source", "name"]).take(survivors).to_pylist()
    raw = _raw_samples(raw_path, rows[survivors], plan.params.batch_size)
    return [sample_row(step, DEDUP_STEPS[step], doc, raw[row][0], row, chars=raw[row][1])
            for (step, survivor), doc in zip(chosen, docs) for row in [int(rows[survivor])]]


def _raw_samples(raw_path: str, wanted: np.ndarray, batch_size: int) -> dict[int, tuple[str, int]]:
    """Raw row -> (its text cut to a sample, its length), read a batch at a time: never the whole
    partition's text, nor more of one text than the sample."""
    out: dict[int, tuple[str, int]] = {}
    start = 0
    for batch in iter_part_arrow(raw_path, batch_size, "ingest", columns=["text"]):
        if start > wanted.max():
            break
        mine = wanted[(wanted >= start) & (wanted < start + batch.num_rows)]
        if len(mine):
            texts = pc.fill_null(batch.column(0).take(pa.array(mine - start)), "")
            cut = pc.utf8_slice_codeunits(texts, 0, SAMPLE_TEXT_CHARS).to_pylist()
            out.update(zip(mine.tolist(), zip(cut, pc.utf8_length(texts).to_pylist())))
        start += batch.num_rows
    return out


# --- The job: plan, three maps, merge. ---

@dataclass(frozen=True)
class CleanJob(DataJob):
    """The partitioned dataset `raw` cleaned into `output` (parts in the same order, rejected samples,
    stats.json, metrics.json, manifest.json last), as a data job (lmforge.data.job)."""

    params: CleanParams
    raw: Path
    output: Path
    staging: Path
    compared = COMPARED

    @property
    def reports(self) -> Path:
        return self.output

    def plan(self) -> list[str]:
        """The raw parts in global order (a clear error before the engine starts if ingest has not run)."""
        return [str(path.resolve()) for path in part_paths(self.raw, "ingest")]

    def run(self, raw_parts: list[str], engine: Engine) -> JobResult:
        params, plan = self.params, Plan(self.params, self.staging.resolve())
        indexes = list(range(len(raw_parts)))
        start = time.perf_counter()
        mapped = engine.map(map_part, [(plan, index, raw) for index, raw in zip(indexes, raw_parts)],
                            desc="clean: filter", postfix=_throughput(start, "stats"))
        resumed = sum(part.get("resumed", False) for part in mapped)
        if resumed:
            log.info("resumed: %d of %d partitions were filtered by an earlier run of this stage", resumed, len(mapped))
        run_key = task_key("run", plan.params_key(), [part["sha256"] for part in mapped], CLEAN_TASK_VERSION)
        survivors = [part["survivors"] for part in mapped]
        names = (["exact"] if params.exact_dedup else []) + (
            [f"band-{band:03d}" for band in range(plan.bands)] if params.near_dedup else [])
        dedup = engine.map(dedup_task, [(plan, name, indexes, survivors, run_key) for name in names], desc="clean: dedup")
        if names:
            engine.map(resolve, [(plan, names, indexes, run_key)], desc="clean: resolve")
        written = engine.map(write_part, [(plan, index, raw, part, run_key)
                                          for index, raw, part in zip(indexes, raw_parts, mapped)],
                             desc="clean: write", postfix=_throughput(start, "stats"))
        seconds = time.perf_counter() - start

        stats = merge_stats([part["stats"] for part in written])
        stats["seconds"] = round(seconds, 3)
        stats["mb_per_s"] = stats["bytes_in"] / 1e6 / seconds if seconds else 0.0
        stats["partitions"] = [
            {"name": part["name"], "documents_in": part["stats"]["documents_in"], "documents_out": part["documents"],
             "bytes_in": part["stats"]["bytes_in"], "filter_seconds": done["seconds"], "write_seconds": part["seconds"]}
            for done, part in zip(mapped, written)
        ]
        stats["dedup_seconds"] = {task["name"]: task["seconds"] for task in dedup}
        stats["workers"] = engine.workers
        samples = plan.staging / REJECTED_SAMPLES
        write_jsonl(samples, merge_samples([part["samples"] for part in written], params.rejected_samples_per_reason))
        parts = [{"name": part["name"], "documents": part["documents"], "bytes": part["bytes"]} for part in written]
        return JobResult(stats, [plan.path("out", part["name"]) for part in written] + [samples],
                         functools.partial(write_parts_manifest, parts=parts))


def _throughput(start: float, stats_key: str) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    def postfix(done: list[dict[str, Any]]) -> dict[str, Any]:
        size = sum(part[stats_key]["bytes_in"] for part in done)
        return {"docs": sum(part[stats_key]["documents_in"] for part in done),
                "MB/s": f"{size / 1e6 / max(time.perf_counter() - start, 1e-9):.1f}"}
    return postfix

