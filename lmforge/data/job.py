"""The one contract of a data stage (ingest, clean, tokenize, the next one): plan on the driver ->
tasks on the engine -> publish -> stats, in the one order `run_data_job` keeps for every job.

A job fills in `DataJob`: `plan` reads its inputs' manifests and cuts the work into tasks (no data
read, no engine yet: a missing input fails in seconds); `run` maps its tasks on the engine (one map
or several, each task writing into `job.staging` with a completion marker, so a killed run resumes)
and returns a `JobResult`: its stats and the staged files to publish. The driver does the rest:
it publishes, writes stats.json, metrics.json and the manifest (last), hashes the output for the
stage run's tags (on the workers), and clears the staging directory once everything is written.

The embedded cluster starts only when it has work to share: more than one partition and at least
the job's `min_workers` workers (2; tokenize's 3). Otherwise (one partition, or engine.workers: 1)
the driver runs the tasks itself, in turn, which gives the same bytes without the ~2 s of starting
worker processes, importing Dask and scheduling; `workers` in the stats is then 0. An
engine.address always gets the tasks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lmforge.core.io import atomic_path, write_json
from lmforge.core.params import EngineParams
from lmforge.core.timings import phase
from lmforge.data.engine import dask_client, hash_in_driver, hash_on_workers, map_tasks, run_in_turn, worker_count
from lmforge.data.partitions import clear_staging_dir, publish

STATS = "stats.json"  # every figure of a run, in the job's `reports` directory
METRICS = "metrics.json"  # the few of them `dvc metrics show` and `dvc exp show` put side by side


@dataclass(frozen=True)
class Engine:
    """Where a job's tasks run: the workers of a Dask client, or (no client) this process, in turn."""

    client: Any = None

    def map(self, function: Callable[[Any], Any], items: list[Any], desc: str,
            postfix: Callable[[list[Any]], dict[str, Any]] | None = None) -> list[Any]:
        """`function(item)` for every item, results in the order of `items` (lmforge.data.engine.map_tasks)."""
        if self.client is None:
            return run_in_turn(function, items)
        return map_tasks(self.client, function, items, desc, postfix)

    @property
    def workers(self) -> int:
        """The engine's worker processes; 0 when the driver does the work itself."""
        return worker_count(self.client) if self.client is not None else 0


@dataclass(frozen=True)
class JobResult:
    """What a job's tasks made: its stats and the staged files the driver publishes."""

    stats: dict[str, Any]  # stats.json; metrics.json holds the job's `compared` keys of it
    staged: list[Path]  # the output directory's files, in staging
    write_manifest: Callable[[Path], None]  # the output directory's manifest, written last
    under: Path | None = None  # staged files keep their path relative to it (None: their name alone)
    beside: dict[Path, Path] = field(default_factory=dict)  # staged file -> its path outside the output


class DataJob(Protocol):
    """A data stage's work, as `run_data_job` runs it: a job subclasses it and fills it in."""

    staging: Path  # the job's own staging directory (lmforge.data.partitions.staging_dir)
    output: Path  # the directory it publishes, replaced as a whole
    reports: Path  # where stats.json (and metrics.json) go
    compared: tuple[str, ...] = ()  # the stats keys metrics.json holds (none: no metrics.json)
    uses_engine: bool = True  # False: the driver does the work (a sequential stream), no engine starts
    # The fewest workers an embedded cluster is worth starting with; fewer: the driver runs the tasks.
    min_workers: int = 2

    def plan(self) -> Any:
        """The tasks, from the inputs' manifests and sizes, on the driver before the engine starts."""

    def run(self, plan: Any, engine: Engine) -> JobResult:
        """The planned tasks on `engine`; raises before anything is published when the result is unusable."""

    def partitions(self, plan: Any) -> int:
        """The partitions `plan` holds (one: no cluster is worth starting for it)."""
        return len(plan)


def run_data_job(job: DataJob, engine: EngineParams | Engine, hash_outputs: bool = False) -> dict[str, Any]:
    """Plan -> engine -> tasks -> publish -> stats.json, metrics.json, manifest (last) -> md5s on the
    workers (`hash_outputs`: for the stage run's output tags) -> staging cleared; returns the stats.
    `engine`: the params of one to start for the job, or one running (a test's, a benchmark's).
    A job that raises leaves its staging directory for the next run to resume from."""
    plan = job.plan()
    needed = (job.uses_engine and not isinstance(engine, Engine)
              and cluster_needed(engine, job.partitions(plan), job.min_workers))
    with _started(engine, needed) as running:
        result = job.run(plan, running)
        with phase("publish"):
            _publish(job, result)
        if hash_outputs:
            with phase("hashing"):
                if running.client is not None:
                    hash_on_workers(running.client, job.output)
                else:
                    hash_in_driver(job.output)
    with phase("publish"):
        clear_staging_dir(job.staging)
    return result.stats


def on_engine(workers: int) -> str:
    """Where a job's tasks ran, for a run's description: its stats' `workers` in words."""
    return f"on {workers} workers" if workers else "in the stage's own process"


def cluster_needed(params: EngineParams, partitions: int, min_workers: int = 2) -> bool:
    """Whether a job of `partitions` partitions runs on a Dask cluster: always at an engine.address;
    the embedded one only with more than one partition and at least `min_workers` workers."""
    return params.address is not None or (partitions > 1 and (params.workers or os.cpu_count() or 1) >= min_workers)


@contextmanager
def _started(engine: EngineParams | Engine, needed: bool) -> Iterator[Engine]:
    if not needed:
        yield engine if isinstance(engine, Engine) else Engine()
        return
    with ExitStack() as stack:
        with phase("engine"):  # the cluster's start, and below its stop: fixed costs of the stage
            client = stack.enter_context(dask_client(engine))
        try:
            yield Engine(client)
        finally:
            with phase("engine"):
                stack.close()


def _publish(job: DataJob, result: JobResult) -> None:
    publish(result.staged, job.output, under=result.under)
    for staged, target in result.beside.items():
        with atomic_path(target) as tmp:
            shutil.copyfile(staged, tmp)
    # Written even when the job kept nothing, so the user can see why.
    write_json(job.reports / STATS, result.stats)
    if job.compared:
        write_json(job.reports / METRICS, {key: result.stats[key] for key in job.compared})
    result.write_manifest(job.output)
