"""The engine of the data stages: Dask distributed, embedded on this machine or a real cluster.

`engine.address: null` starts a `LocalCluster` of worker processes (one thread each: the filters
and the dedup hold the GIL) for the length of a stage; `engine.address: tcp://host:8786` joins an
existing scheduler (`dask scheduler` + `dask worker`, dask-jobqueue, dask-kubernetes). The stages
only plan and merge small results here; partitions are read and written by the workers.

A LocalCluster starts worker processes with `spawn`: create it only under
`if __name__ == "__main__":` (every stage runs through `lmforge.cli.run_stage`, which is).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar

import pyarrow
from tqdm import tqdm

from lmforge.errors import LmforgeError
from lmforge.lineage import file_md5, remember_md5
from lmforge.params import EngineParams

T = TypeVar("T")
R = TypeVar("R")

# Fault injection for the tests, never set in a real run (specs separated by commas):
# "<stage>:<partition>:exit:<flag file>" ends
# the worker process running that partition's task once, after its output and before its marker
# (an OOM kill mid-task); "<stage>:<partition>:hang" blocks that task so a test can kill the stage.
FAULT_ENV = "LMFORGE_TEST_FAULT"
# Seconds to reach a scheduler given by engine.address before saying it is not there.
CONNECT_TIMEOUT_S = 10
# A task whose worker process dies (OOM kill, preemption) is rerun on another worker this many
# times before the stage fails; partition tasks are idempotent (atomic writes), so a rerun is safe.
TASK_RETRIES = 2


@contextmanager
def dask_client(params: EngineParams) -> Iterator[Any]:
    """A `distributed.Client` for the stage: embedded cluster or engine.address; closed on exit."""
    from distributed import Client, LocalCluster

    # Importing distributed sets its loggers to INFO; a stage's log would be mostly cluster chatter.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if params.address:
        try:
            client = Client(params.address, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise LmforgeError(
                f"engine.address {params.address}: no Dask scheduler answered within {CONNECT_TIMEOUT_S} s ({exc}); "
                "start one (`dask scheduler`, then `dask worker <address>` on each machine) or set "
                "engine.address: null in params.yaml for the embedded engine"
            ) from None
        with client:
            _print_dashboard(client, params)
            yield client
        return
    workers = params.workers or os.cpu_count() or 1
    with LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        # A free port always: the scheduler serves its HTTP routes even without the dashboard,
        # on 8787 by default, which two stages (or tests) at once would contend for.
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"dashboard": params.dashboard},
        # Only CRITICAL from the cluster's own loggers: at shutdown a worker whose heartbeat meets
        # the closing scheduler logs a CommClosedError traceback (a race, not a fault). Nothing is
        # lost: a task's exception and a dead worker (KilledWorker) reach the stage through its future.
        silence_logs=logging.CRITICAL,
    ) as cluster, Client(cluster) as client:
        _print_dashboard(client, params)
        yield client


def _print_dashboard(client: Any, params: EngineParams) -> None:
    if params.dashboard and client.dashboard_link:
        print(f"[lmforge] Dask dashboard: {client.dashboard_link}", file=sys.stderr, flush=True)


def worker_count(client: Any) -> int:
    return len(client.scheduler_info().get("workers", {}))


def map_tasks(
    client: Any,
    function: Callable[[T], R],
    items: Sequence[T],
    desc: str,
    postfix: Callable[[list[R]], dict[str, Any]] | None = None,
) -> list[R]:
    """`function(item)` for every item on the cluster; results in the order of `items`.

    One progress bar over the tasks (postfix from the results so far); a task whose worker died
    is retried (TASK_RETRIES); the first task that raises cancels the rest and re-raises here.
    """
    from distributed import as_completed

    if not items:
        return []
    # pure=False: a partition rerun (resume, a changed input) is never served from a cached key.
    futures = client.map(WorkerTask(function), items, pure=False, retries=TASK_RETRIES,
                         key=getattr(function, "__name__", "task"))
    index_of = {future.key: index for index, future in enumerate(futures)}
    results: list[Any] = [None] * len(items)
    done: list[R] = []
    try:
        with tqdm(total=len(items), unit="part", desc=desc, disable=None) as bar:
            for future in as_completed(futures):
                result = future.result()  # re-raises the task's exception, with its message
                if isinstance(result, UserError):
                    raise result.error
                results[index_of[future.key]] = result
                done.append(result)
                if postfix is not None:
                    bar.set_postfix(postfix(done), refresh=False)
                bar.update(1)
    finally:
        client.cancel(futures)
    return results


class UserError(NamedTuple):
    """A task's LmforgeError, returned instead of raised (see WorkerTask)."""

    error: LmforgeError


class WorkerTask:
    """`function` as a task on a worker: a user error is not retried, and the memory the task freed
    is handed back before the next one.

    Dask retries a task that raised (TASK_RETRIES), which is right for a worker that died and wrong
    for bad input or params: the same LmforgeError would come back twice more after as many wasted
    runs. It travels back as a UserError result and map_tasks raises it.

    Memory, measured on the clean stage's filter task (30 partitions in a row in one process): RSS
    crept from ~205 to ~390 MB, as freed Arrow buffers stayed in pyarrow's pool and Python held what
    a full collection would return; with a full `gc.collect()` and the pool's `release_unused()`
    after each task it stayed at 190-250 MB, so a worker's peak is that of one partition however
    many it runs in turn. Both cost ~35 ms against a partition's seconds.
    """

    def __init__(self, function: Callable[[T], R]) -> None:
        self.function = function

    def __call__(self, item: T) -> R | UserError:
        try:
            return self.function(item)
        except LmforgeError as error:
            return UserError(error)
        finally:
            gc.collect()
            pyarrow.default_memory_pool().release_unused()


def hash_on_workers(client: Any, directory: Path) -> None:
    """DVC's md5 of every file under `directory`, computed by the workers (each its share of the
    files) and remembered for the stage run's output tags (lineage.remember_md5), so the driver
    never reads the data its workers wrote. A file changed afterwards is hashed again."""
    files = sorted((path for path in Path(directory).rglob("*") if path.is_file()),
                   key=lambda path: path.stat().st_size, reverse=True)
    # One task per worker, files dealt largest first: a task per file would cost more than the
    # hashing for the many small files of a shards directory.
    workers = max(worker_count(client), 1)
    shares = [[str(path.resolve()) for path in files[i::workers]] for i in range(min(workers, len(files)))]
    for share in map_tasks(client, _md5_of_files, shares, desc=f"md5 {directory}"):
        for path, md5 in share.items():
            remember_md5(Path(path), md5)


def _md5_of_files(paths: list[str]) -> dict[str, str]:
    return {path: file_md5(path) for path in paths}


def throughput_postfix(started: float) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """The progress bar's postfix from task results that carry "documents" and "bytes"."""
    def postfix(done: list[dict[str, Any]]) -> dict[str, Any]:
        seconds = max(time.perf_counter() - started, 1e-9)
        return {"docs": f"{sum(r['documents'] for r in done):,}",
                "MB/s": f"{sum(r['bytes'] for r in done) / 1e6 / seconds:.1f}"}
    return postfix


def fault_point(stage: str, partition: int) -> None:
    """Where a partition task obeys FAULT_ENV (see there); nothing when it is unset."""
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        where, index, action, *flag = spec.split(":", 3)
        if where != stage or int(index) != partition:
            continue
        if action == "hang":
            while True:
                time.sleep(1)
        if action == "exit" and flag and not Path(flag[0]).exists():
            Path(flag[0]).write_text(f"worker {os.getpid()} exited in {stage} partition {partition}\n")
            os._exit(1)
