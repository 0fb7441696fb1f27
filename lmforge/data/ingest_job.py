"""Ingest as tasks over partitions: the driver plans partitions of about data.partition_mb from file
sizes and Parquet footers (no data read); each task reads its slices into one Parquet part.

The plan follows the inputs' order (file order, then offset in the file), so the parts in plan order
hold the documents in global order whatever the number of workers. The Hugging Face source is one
sequential stream: the driver reads it into parts itself (`write_stream_parts`). `IngestJob` is the
stage's data job (lmforge.data.job: the driver publishes, writes the stats and clears staging).
"""

from __future__ import annotations

import functools
import itertools
import logging
import platform
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lmforge.data.sources.builtin import iter_builtin_files, stdlib_dir, stdlib_source_files
from lmforge.data.documents import Document, split_of
from lmforge.data.documents import DocumentWriter
from lmforge.data.sources.locations import input_identity, input_location, input_size, open_input, resolve_files
from lmforge.data.markers import completed, mark_completed, task_key
from lmforge.data.job import DataJob, Engine, JobResult
from lmforge.data.partitions import part_name, write_parts_manifest
from lmforge.data.sources.readers import FileRange, open_parquet
from lmforge.data.sources.configured import (COUNTER_KEYS, check_supported, counted, file_range_documents,
                                             iter_hf_documents, pools, splittable)
from lmforge.data.engine import fault_point, throughput_postfix
from lmforge.core.errors import LmforgeError
from lmforge.core.params import DataParams

log = logging.getLogger(__name__)

STAGE = "ingest"
# Bumped when a part's contents change for the same inputs and params: older markers are stale.
INGEST_TASK_VERSION = 1


@dataclass(frozen=True)
class IngestJob(DataJob):
    """Every document of `data`'s source -> `output` (parts, stats.json, manifest.json last), as a
    data job (lmforge.data.job)."""

    data: DataParams
    output: Path
    staging: Path  # no metrics.json (`compared` empty): ingest's figures are the corpus's, not a result

    @property
    def reports(self) -> Path:
        return self.output

    @property
    def uses_engine(self) -> bool:
        return self.data.source != "hf"  # the Hub's stream is read by the driver

    def plan(self) -> list[IngestTask]:
        return plan_tasks(self.data, self.staging) if self.uses_engine else []

    def run(self, tasks: list[IngestTask], engine: Engine) -> JobResult:
        data, staging = self.data, self.staging.resolve()
        started = time.perf_counter()
        counters: Counter = Counter({key: 0 for key in COUNTER_KEYS})
        if not self.uses_engine:
            results = write_stream_parts(iter_hf_documents(data.hf, data.text_field, counters), counters, data, staging)
        else:
            results = engine.map(run_partition, tasks, desc="ingest", postfix=throughput_postfix(started))
            for result in results:
                counters.update(result["counters"])
        resumed = sum(result.pop("resumed") for result in results)
        if resumed:
            log.info("resumed: %d of %d partitions were complete from a killed run and were not read again",
                     resumed, len(results))
        seconds = time.perf_counter() - started
        documents = sum(result["documents"] for result in results)
        if documents == 0:
            # Nothing is published: the previous parts, manifest and stats stay as they were.
            raise LmforgeError(_no_documents(data, counters, self.output))
        size = sum(result["bytes"] for result in results)
        stats = {
            "source": data.source,
            "python": platform.python_version(),
            "documents": documents,
            "bytes": size,
            "train_documents": sum(result["train_documents"] for result in results),
            "val_documents": sum(result["val_documents"] for result in results),
            "seconds": round(seconds, 3),
            "mb_per_s": size / 1e6 / seconds if seconds else 0.0,
            "counters": dict(sorted(counters.items())),
            "partitions": len(results),
            "workers": engine.workers,  # 0: the driver did the work (the Hub's stream, one partition, one worker)
            "parts": [{key: result[key] for key in ("name", "documents", "bytes", "train_documents", "val_documents",
                                                     "seconds")} for result in results],
        }
        parts = [{key: result[key] for key in ("name", "documents", "bytes")} for result in results]
        return JobResult(stats, [staging / result["name"] for result in results],
                         functools.partial(write_parts_manifest, parts=parts, source=data.source))


def _no_documents(data: DataParams, counters: Counter, output: Path) -> str:
    where = {"files": f"data.files {data.files}",
             "sources": f"data.sources {data.source_names}"}.get(data.source, f"the {data.source!r} source")
    problems = {key: count for key, count in counters.items() if count and key != "documents"}
    return (
        f"{where} gave no documents ({problems or 'nothing was read'}); nothing was published, "
        f"{output} is unchanged: point data.source/data.files in params.yaml at files with text"
    )


class IngestTask(NamedTuple):
    index: int
    partition: dict[str, Any]  # {"slices": [[path, location, start, stop], ...]} or {"builtin": [...], "topics": bool}
    data: dict[str, Any]  # DataParams as JSON
    staging: str  # absolute: the workers of an external cluster have their own working directory
    key: str  # the completion marker's key


def plan_tasks(data: DataParams, staging: Path) -> list[IngestTask]:
    """The partitions of the builtin or files source, in global order, as tasks."""
    target = max(1, int(data.partition_mb * 1e6))
    partitions = _plan_builtin(target) if data.source == "builtin" else _plan_files(data, target)
    dumped = data.model_dump(mode="json")
    staging = staging.resolve()
    return [
        IngestTask(index, partition, dumped, str(staging), task_key(INGEST_TASK_VERSION, partition, dumped))
        for index, partition in enumerate(partitions)
    ]


def _plan_builtin(target: int) -> list[dict[str, Any]]:
    """Groups of stdlib source files of about `target` bytes of source; the topics go last."""
    root = stdlib_dir()
    groups = _pack(((path.relative_to(root).as_posix(), path.stat().st_size) for path in stdlib_source_files(root)), target)
    # The Python version is the builtin corpus's version: a marker from another Python is stale.
    return [{"builtin": group, "topics": i == len(groups) - 1, "python": platform.python_version()}
            for i, group in enumerate(groups or [[]])]


def _plan_files(data: DataParams, target: int) -> list[dict[str, Any]]:
    """Slices of the files of each pool in order; a named source's slices end with its name."""
    slices: list[tuple[list[Any], int]] = []
    for index, (name, pool) in enumerate(pools(data)):
        named = [name] if data.source == "sources" else []  # the one pool's slices (and markers) as before
        key = f"data.sources[{index}].files" if named else "data.files"
        slices.extend((slice_ + named, estimate) for slice_, estimate in _file_slices(pool, target, key))
    return [{"slices": group} for group in _pack(iter(slices), target)]


def _file_slices(data: DataParams, target: int, key: str) -> list[tuple[list[Any], int]]:
    paths = resolve_files(data.files, key)
    for path in paths:  # checked before any work, so a typo fails in seconds, not hours
        check_supported(path)
    slices: list[tuple[list[Any], int]] = []
    for path in paths:
        location = input_location(path)
        size = input_size(location)
        # The input's size and modification time are in the slice, so the marker of a changed file is stale.
        identity = input_identity(location)
        if path.lower().endswith(".parquet") and size > target:
            spans = _row_group_spans(path, location, target)
        elif splittable(path, data) and size > target:
            spans = [(start, start + target if start + target < size else None, min(target, size - start))
                     for start in range(0, size, target)]
        else:
            spans = [(0, None, size)]
        slices.extend(([path, location, start, stop, identity], estimate) for start, stop, estimate in spans)
    return slices


def _row_group_spans(path: str, location: str, target: int) -> list[tuple[int, int | None, int]]:
    """Runs of consecutive row groups of about `target` uncompressed bytes, from the footer."""
    with open_input(location) as handle:
        metadata = open_parquet(handle, path).metadata
        sizes = [metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)]
    spans, start, size = [], 0, 0
    for group, group_size in enumerate(sizes):
        if group > start and size + group_size > target:
            spans.append((start, group, size))
            start, size = group, 0
        size += group_size
    spans.append((start, None, size))
    return spans


def _pack(items: Iterator[tuple[Any, int]], target: int) -> list[list[Any]]:
    """Consecutive items grouped into runs of about `target` bytes (an item larger than that alone)."""
    groups: list[list[Any]] = []
    current: list[Any] = []
    size = 0
    for item, item_size in items:
        if current and size + item_size > target:
            groups.append(current)
            current, size = [], 0
        current.append(item)
        size += item_size
    if current:
        groups.append(current)
    return groups


def _partition_documents(partition: dict[str, Any], data: DataParams, counters: Counter) -> Iterator[Document]:
    if "builtin" in partition:
        yield from iter_builtin_files(partition["builtin"], partition["topics"], counters)
        return
    read_with = dict(pools(data))
    for path, location, start, stop, _identity, *named in partition["slices"]:
        source = named[0] if named else "files"
        yield from file_range_documents(FileRange(path, location, start, stop), read_with[source], counters, source)


def run_partition(task: IngestTask) -> dict[str, Any]:
    """One partition into `<staging>/part-NNNNN.parquet` and its completion marker; a partition
    whose marker matches is not read again. Returns the part's figures ("resumed": skipped)."""
    staging, name = Path(task.staging), part_name(task.index)
    done = completed(staging, name, task.key, [staging / name])
    if done is not None:
        return {**done, "resumed": True}
    data = DataParams(**task.data)
    counters: Counter = Counter({key: 0 for key in COUNTER_KEYS})
    started = time.perf_counter()
    result = _write_part(counted(_partition_documents(task.partition, data, counters), counters),
                         staging / name, data)
    fault_point(STAGE, task.index)
    result.update(counters=dict(sorted(counters.items())), seconds=round(time.perf_counter() - started, 3))
    mark_completed(staging, name, task.key, result)
    return {**result, "resumed": False}


def _write_part(documents: Iterator[Document], path: Path, data: DataParams) -> dict[str, Any]:
    splits: Counter = Counter()
    with DocumentWriter(path) as writer:
        while batch := list(itertools.islice(documents, data.batch_size)):
            writer.write(batch)
            splits.update(split_of(doc["id"], data.val_fraction) for doc in batch)
    return {"name": path.name, "documents": writer.documents, "bytes": writer.bytes,
            "train_documents": splits["train"], "val_documents": splits["val"]}


def write_stream_parts(documents: Iterator[Document], counters: Counter, data: DataParams, staging: Path) -> list[dict[str, Any]]:
    """A sequential source (the Hub's stream) cut into parts of about data.partition_mb, written by
    the driver: a stream cannot be split between workers without reading it. Not resumable."""
    target = data.partition_mb * 1e6
    results: list[dict[str, Any]] = []
    documents = counted(documents, counters)
    while True:
        started, bytes_before = time.perf_counter(), counters["bytes"]
        head = next(documents, None)
        if head is None:
            return results
        part = _until_bytes(itertools.chain([head], documents), counters, bytes_before + target)
        result = _write_part(part, staging / part_name(len(results)), data)
        results.append({**result, "counters": {}, "seconds": round(time.perf_counter() - started, 3), "resumed": False})


def _until_bytes(documents: Iterator[Document], counters: Counter, limit: float) -> Iterator[Document]:
    """Documents until the counted bytes reach `limit`; the one that reaches it is the last."""
    for doc in documents:
        yield doc
        if counters["bytes"] >= limit:
            return
