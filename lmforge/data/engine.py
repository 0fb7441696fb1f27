"""The engine of the data stages: Dask distributed, embedded on this machine or a real cluster.

`engine.address: null` starts a `LocalCluster` of worker processes (one thread each: the filters
and the dedup hold the GIL) for the length of a stage, when it has more than one partition for more
than one worker (else the driver runs the tasks in turn: lmforge.data.job); `engine.address:
tcp://host:8786` joins an existing scheduler (`dask scheduler` + `dask worker`, dask-jobqueue,
dask-kubernetes). The stages only plan and merge small results here; partitions are read and
written by the workers.

A LocalCluster starts worker processes with `spawn`: create it only under
`if __name__ == "__main__":` (every stage runs through `lmforge.core.stage.run_stage`, which is).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import sys
import time
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar

import pyarrow
from tqdm import tqdm

from lmforge.core.errors import LmforgeError
from lmforge.core.digests import file_md5, md5_of, recording_md5s, remember_md5
from lmforge.core.params import EngineParams
from lmforge.core.redact import redact

T = TypeVar("T")
R = TypeVar("R")

# Fault injection for the tests, never set in a real run (specs separated by commas):
# "<stage>:<partition>:exit:<flag file>" ends
# the worker process running that partition's task once, after its output and before its marker
# (an OOM kill mid-task); "<stage>:<partition>:hang" blocks that task so a test can kill the stage.
FAULT_ENV = "LMFORGE_TEST_FAULT"
# Seconds to reach a scheduler given by engine.address (TCP connection, then Dask's handshake, then
# the Client's own requests, each) before saying it is not there.
CONNECT_TIMEOUT_S = 10
# Seconds a worker process of the embedded engine may take to start (spawn, imports, preloads,
# registration): seconds normally, more on a loaded machine; a worker that never starts is an error.
WORKER_START_TIMEOUT_S = 60
# A task whose worker process dies (OOM kill, preemption) is rerun on another worker this many
# times before the stage fails; partition tasks are idempotent (atomic writes), so a rerun is safe.
TASK_RETRIES = 2


@contextmanager
def dask_client(params: EngineParams) -> Iterator[Any]:
    """A `distributed.Client` for the stage: embedded cluster or engine.address; closed on exit."""
    from distributed import Client

    # Importing distributed sets its loggers to INFO; a stage's log would be mostly cluster chatter.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if params.address:
        with _connect(params.address) as client:
            _print_dashboard(client, params)
            yield client
        return
    with _start_local_cluster(params.workers or os.cpu_count() or 1, params.dashboard) as cluster, Client(cluster) as client:
        _print_dashboard(client, params)
        yield client


def _connect(address: str) -> Any:
    """A Client of the scheduler at `address`, or one LmforgeError within a few CONNECT_TIMEOUT_S.

    Dask's own connect retries a refused port for its whole timeout, then waits without limit for
    the peer's handshake: any TCP server that is not a scheduler (an HTTP server, a silent port)
    held the stage until the flow's stage timeout. So the address is tried first, bounded: a TCP
    connection (refused or unknown host: at once), then Dask's handshake; the Client that follows
    talks to a server that has just answered it, and bounds its own requests by the same timeout.
    """
    from distributed import Client

    shown = redact(address)
    fix = ("start a scheduler there (`dask scheduler`, then `dask worker <address>` on each machine), or set "
           "engine.address: null in params.yaml for the embedded engine")
    try:
        host_port = _host_port(address)
    except ValueError as exc:
        # Dask's message repeats the address without its scheme, where redact would not see a password.
        why = "a Dask address carries no user or password" if "@" in address else redact(str(exc))
        raise LmforgeError(f"engine.address {shown} is not a Dask scheduler address ({why}): give its URL as "
                           "tcp://host:port, e.g. tcp://10.0.0.5:8786, or set engine.address: null in params.yaml "
                           "for the embedded engine") from None
    try:
        if host_port is not None:
            with socket.create_connection(host_port, timeout=CONNECT_TIMEOUT_S):
                pass
    except ConnectionRefusedError:
        raise LmforgeError(f"engine.address {shown}: connection refused, nothing listens there: {fix}") from None
    except OSError as exc:  # unknown host, unreachable network, no answer (a firewall that drops)
        why = redact(str(exc)) or f"no answer within {CONNECT_TIMEOUT_S} s"
        raise LmforgeError(f"engine.address {shown}: cannot reach it ({why}): check the host and port; {fix}") from None
    try:
        # A thread's own event loop: the caller may be running one (a notebook), where asyncio.run fails.
        with ThreadPoolExecutor(1) as thread:
            thread.submit(asyncio.run, _handshake(address)).result()
    except Exception as exc:  # noqa: BLE001 - a server that is not Dask fails the handshake in any way
        why = (f"no answer to Dask's handshake within {CONNECT_TIMEOUT_S} s" if isinstance(exc, TimeoutError)
               else f"its answer to Dask's handshake: {type(exc).__name__} {redact(str(exc))[:100]}".rstrip())
        raise LmforgeError(f"engine.address {shown}: the server there is not a Dask scheduler ({why}): check the "
                           f"port (a scheduler listens on 8786 unless told otherwise); {fix}") from None
    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - it speaks Dask but is no scheduler (a worker's address), or went away
        why = f"{type(exc).__name__} {redact(str(exc))[:100]}".rstrip()
        raise LmforgeError(f"engine.address {shown}: no Dask scheduler answered as one within {CONNECT_TIMEOUT_S} s "
                           f"({why}): check the port (a worker's is not the scheduler's); {fix}") from None


def _host_port(address: str) -> tuple[str, int] | None:
    """The TCP host and port of a scheduler address (None for a transport that has none, e.g.
    ucx); ValueError when Dask cannot parse it."""
    from distributed.comm.addressing import parse_address
    from distributed.comm.registry import get_backend

    scheme, location = parse_address(address, strict=True)
    try:
        return get_backend(scheme).get_address_host_port(location)
    except NotImplementedError:
        return None


async def _handshake(address: str) -> None:
    """Dask's connection handshake with `address`, within CONNECT_TIMEOUT_S in all."""
    from distributed.comm import connect
    from distributed.security import Security

    connection_args = Security().get_connection_args("client")  # TLS settings from Dask's config, as Client's
    comm = await asyncio.wait_for(connect(address, timeout=CONNECT_TIMEOUT_S, **connection_args),
                                  CONNECT_TIMEOUT_S)
    await comm.close()


def _start_local_cluster(workers: int, dashboard: bool) -> Any:
    """The embedded engine's LocalCluster, started again once if a worker died or hung at start (a
    passing memory squeeze, a slow machine); then one LmforgeError saying what to try."""
    try:
        return _local_cluster(workers, dashboard)
    except Exception as exc:  # noqa: BLE001 - Dask words a failed start many ways (RuntimeError, TimeoutError)
        print(f"[lmforge] the embedded Dask engine did not start ({_root_cause(exc)}); starting it again",
              file=sys.stderr, flush=True)
    try:
        return _local_cluster(workers, dashboard)
    except Exception as exc:  # noqa: BLE001
        raise LmforgeError(
            f"the embedded Dask engine could not start its {workers} worker process(es), twice "
            f"({_root_cause(exc)}): a worker that dies at start is most often out of memory; set engine.workers "
            f"lower in params.yaml (now {workers}), free memory, or check the DASK_* settings (e.g. a worker preload)"
        ) from None


def _local_cluster(workers: int, dashboard: bool) -> Any:
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        # A free port always: the scheduler serves its HTTP routes even without the dashboard,
        # on 8787 by default, which two stages (or tests) at once would contend for.
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"dashboard": dashboard},
        # Bounds each worker's start (process, preloads, registration): without it a worker that never
        # comes up holds the stage forever. After its start a worker does not use it.
        death_timeout=WORKER_START_TIMEOUT_S,
        # Only CRITICAL from the cluster's own loggers: at shutdown a worker whose heartbeat meets
        # the closing scheduler logs a CommClosedError traceback (a race, not a fault). Nothing is
        # lost: a task's exception and a dead worker (KilledWorker) reach the stage through its future.
        silence_logs=logging.CRITICAL,
    )


def _root_cause(exc: BaseException) -> str:
    """The innermost exception of a chain, as one short line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"[:200]


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
    is handed back before the next one (handing_back).

    Dask retries a task that raised (TASK_RETRIES), which is right for a worker that died and wrong
    for bad input or params: the same LmforgeError would come back twice more after as many wasted
    runs. It travels back as a UserError result and map_tasks raises it.
    """

    def __init__(self, function: Callable[[T], R]) -> None:
        self.function = function

    def __call__(self, item: T) -> R | UserError:
        with handing_back():
            try:
                return self.function(item)
            except LmforgeError as error:
                return UserError(error)


@contextmanager
def handing_back() -> Iterator[None]:
    """One task's run, then what it freed handed back: its reference cycles collected and pyarrow's
    pool trimmed, so a process running partition after partition peaks at one partition's memory.

    Memory, measured on the clean stage's filter task (30 partitions in a row in one process): RSS
    crept from ~205 to ~390 MB, as freed Arrow buffers stayed in pyarrow's pool and Python held what
    a collection would return; collected and trimmed after each task it stayed at 190-250 MB.

    The heap that was there before the task (a Dask worker's own state and imports, or the driver's
    and its tracking client) is frozen meanwhile, so the collection walks only what the task made:
    a full one cost a worker ~40 ms a task, more than a small partition's whole work (bench/task_overhead.py)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.collect()
        pyarrow.default_memory_pool().release_unused()
        gc.unfreeze()


def run_in_turn(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`function(item)` for every item in this process, one after another, each task's memory
    handed back before the next as on a worker (handing_back). The md5s of the parts and shards the
    tasks write are remembered as they are written, for the output tags (hash_in_driver)."""
    results = []
    with recording_md5s():
        for item in items:
            with handing_back():
                results.append(function(item))
    return results


def hash_on_workers(client: Any, directory: Path) -> None:
    """DVC's md5 of every file under `directory`, computed by the workers (each its share of the
    files) and remembered for the stage run's output tags (digests.remember_md5), so the driver
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


def hash_in_driver(directory: Path) -> None:
    """hash_on_workers for a job whose tasks ran in the driver: the parts and shards it wrote were
    hashed as they were written (run_in_turn); what is left (the manifest, the stats, a part of a
    killed run's that this one resumed from) is read here."""
    for path in sorted(path for path in Path(directory).rglob("*") if path.is_file()):
        remember_md5(path, md5_of(path))


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
