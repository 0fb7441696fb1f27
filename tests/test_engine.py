"""The data stages' engine: an embedded Dask cluster of processes, results in input order,
a clear error within seconds for a scheduler that is not there or not a scheduler, a cluster start
that survives one dead worker and is bounded, and completion markers."""

from __future__ import annotations

import gc
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dask
import pytest

from lmforge.data.markers import completed, mark_completed, task_key
from lmforge.core import digests
from lmforge.track import lineage
from lmforge.data import engine
from lmforge.data.engine import UserError, WorkerTask, dask_client, hash_on_workers, map_tasks, run_in_turn, worker_count
from lmforge.core.errors import LmforgeError
from lmforge.core.params import EngineParams

from conftest import REPO, make_repo, run, tool_env, write_params


def _pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("partition 3 is bad")
    return x


def test_embedded_cluster_runs_tasks_in_worker_processes_and_keeps_input_order():
    with dask_client(EngineParams(workers=2)) as client:
        assert worker_count(client) == 2
        results = map_tasks(client, _pid_and_square, list(range(20)), desc="test")
        assert [square for _, square in results] == [x * x for x in range(20)]
        assert os.getpid() not in {pid for pid, _ in results}
        with pytest.raises(ValueError, match="partition 3 is bad"):
            map_tasks(client, _fail_on_three, list(range(6)), desc="test")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_closed_port_fails_at_once_naming_engine_address():
    # Dask's own connect retries a refused port for its whole timeout; nothing listening is final.
    port = _closed_port()
    started = time.monotonic()
    with pytest.raises(LmforgeError, match=rf"engine.address tcp://127.0.0.1:{port}: .*refused.*engine.address: null"):
        with dask_client(EngineParams(address=f"tcp://127.0.0.1:{port}")):
            pass
    assert time.monotonic() - started < engine.CONNECT_TIMEOUT_S / 2


@contextmanager
def _silent_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts every connection and never says a word; its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()
    accepted: list[socket.socket] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for connection in [*accepted, server]:
            connection.close()


@contextmanager
def _http_server() -> Iterator[int]:
    """An HTTP file server on 127.0.0.1 (it waits for a request line Dask never sends); its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


# Connects in a child process (with a 2 s bound), so a connect that hangs cannot hang the test.
CONNECT = """
import sys
import lmforge.data.engine as engine
from lmforge.core.errors import LmforgeError
from lmforge.core.params import EngineParams
engine.CONNECT_TIMEOUT_S = 2
try:
    with engine.dask_client(EngineParams(address=sys.argv[1])):
        print("connected")
except LmforgeError as error:
    print(error)
"""


@pytest.mark.parametrize("server", [_silent_server, _http_server], ids=["silent", "http"])
def test_a_server_that_is_not_a_scheduler_is_one_clear_error_within_seconds(server):
    # Dask's handshake waits without limit for the peer's first bytes: any TCP server hung the stage.
    with server() as port:
        result = subprocess.run([sys.executable, "-c", CONNECT, f"tcp://127.0.0.1:{port}"], cwd=REPO,
                                env=tool_env(), capture_output=True, text=True, timeout=60)
    message = result.stdout.strip()
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert message.startswith(f"engine.address tcp://127.0.0.1:{port}: ") and "not a Dask scheduler" in message
    assert "engine.address: null" in message and len(message.splitlines()) == 1, message


def test_an_engine_address_dask_cannot_parse_is_one_clear_error_without_its_password():
    with pytest.raises(LmforgeError, match=r"engine.address tcp://ops:\*\*\*@127.0.0.1:\d+ .*tcp://host:port") as caught:
        with dask_client(EngineParams(address=f"tcp://ops:s3cret@127.0.0.1:{_closed_port()}")):
            pass
    assert "s3cret" not in str(caught.value)


# Worker preloads (Dask runs them in each worker process as it starts) that make a worker die at start.
DIES_ONCE = """
import os, pathlib
marker = pathlib.Path({marker!r})
if not marker.exists():
    marker.write_text("died once")
    os._exit(1)
"""
ALWAYS_DIES = "import os\nos._exit(1)\n"
NEVER_STARTS = "import time\ntime.sleep(3600)\n"


def test_a_worker_that_dies_while_the_cluster_starts_is_retried_once(tmp_path):
    marker = tmp_path / "died"
    preload = tmp_path / "dies_once.py"
    preload.write_text(DIES_ONCE.format(marker=str(marker)))
    with dask.config.set({"distributed.worker.preload": [str(preload)]}):
        with dask_client(EngineParams(workers=1)) as client:
            assert map_tasks(client, abs, [-1, -2], desc="test") == [1, 2]
    assert marker.read_text() == "died once"


# Starts the embedded engine in a child process (workers bounded to 3 s), so a start that hangs
# cannot hang the test.
START = """
import lmforge.data.engine as engine
from lmforge.core.errors import LmforgeError
from lmforge.core.params import EngineParams
engine.WORKER_START_TIMEOUT_S = 3
if __name__ == "__main__":
    try:
        with engine.dask_client(EngineParams(workers=1)):
            print("started")
    except LmforgeError as error:
        print(error)
"""


def test_a_worker_that_never_starts_is_one_clear_error_within_seconds(tmp_path):
    preload = tmp_path / "never_starts.py"
    preload.write_text(NEVER_STARTS)
    (tmp_path / "start.py").write_text(START)
    result = subprocess.run([sys.executable, "start.py"], cwd=tmp_path, capture_output=True, text=True, timeout=90,
                            env=tool_env(PYTHONPATH=str(REPO), DASK_DISTRIBUTED__WORKER__PRELOAD=f'["{preload}"]'))
    message = result.stdout.strip()
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "embedded Dask engine" in message and "engine.workers" in message and len(message.splitlines()) == 1


@pytest.fixture(scope="module")
def engine_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny repository whose data stages have not run (the stages below fail before any output)."""
    return make_repo(tmp_path_factory.mktemp("engine_repo"), n_docs=20)


def _stage_error(result: subprocess.CompletedProcess) -> str:
    """The stage's one `[ingest] error:` line, after checking it failed with no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("[ingest] error:")]
    assert len(errors) == 1, output
    return errors[0]


def test_a_data_stage_whose_workers_always_die_at_start_fails_in_one_line(engine_repo, tmp_path):
    preload = tmp_path / "always_dies.py"
    preload.write_text(ALWAYS_DIES)
    # Two workers and several partitions: with one of either the driver does the work, no cluster starts.
    write_params(engine_repo, engine={"workers": 2}, data={"partition_mb": 0.001})
    result = run(["python", "-m", "stages.ingest"], engine_repo, check=False,
                 DASK_DISTRIBUTED__WORKER__PRELOAD=f'["{preload}"]')
    line = _stage_error(result)
    assert "embedded Dask engine" in line and "engine.workers" in line, line


def test_a_data_stage_with_a_bad_engine_address_fails_in_one_line_without_its_password(engine_repo):
    write_params(engine_repo, engine={"address": f"tcp://ops:s3cret@127.0.0.1:{_closed_port()}"})
    line = _stage_error(run(["python", "-m", "stages.ingest"], engine_repo, check=False))
    assert "engine.address tcp://ops:***@127.0.0.1" in line and "s3cret" not in line, line


def test_engine_address_must_be_a_url():
    with pytest.raises(ValueError, match="scheduler's URL"):
        EngineParams(address="10.0.0.5")


def test_markers_are_keyed_and_damage_means_rerun(tmp_path):
    key = task_key({"clean": {"min_chars": 16}}, "input-hash", 1)
    assert completed(tmp_path, "part-00000", key) is None
    mark_completed(tmp_path, "part-00000", key, {"documents": 3})
    assert completed(tmp_path, "part-00000", key) == {"documents": 3}
    assert completed(tmp_path, "part-00000", task_key("other")) is None
    # A marker whose task's outputs are gone (deleted by hand) means the task runs again.
    (tmp_path / "part-00000.parquet").write_bytes(b"x")
    assert completed(tmp_path, "part-00000", key, [tmp_path / "part-00000.parquet"]) == {"documents": 3}
    assert completed(tmp_path, "part-00000", key, [tmp_path / "part-00001.parquet"]) is None
    (tmp_path / ".done" / "part-00000.json").write_bytes(b"\xff{not json")
    assert completed(tmp_path, "part-00000", key) is None


class _Cycle:
    def __init__(self) -> None:
        self.me = self
        self.payload = bytearray(1 << 20)


def test_a_task_hands_back_what_it_freed_before_the_next_runs():
    # A worker runs partition after partition: garbage one task left in reference cycles must not
    # stack up until Python's next full collection (the worker's peak would grow with the corpus).
    refs: list[weakref.ref] = []
    frozen: list[int] = []

    def task(n: int) -> int:
        cycle = _Cycle()
        refs.append(weakref.ref(cycle))
        frozen.append(gc.get_freeze_count())
        return n * 2

    assert WorkerTask(task)(21) == 42
    assert refs[0]() is None
    # The driver running the tasks itself (one partition, one worker) hands it back the same way.
    assert run_in_turn(task, [1, 2]) == [2, 4]
    assert refs[1]() is None and refs[2]() is None and gc.get_freeze_count() == 0
    # The heap from before each task is frozen while it runs: the collection after it walks only what
    # the task made, not a Dask worker's whole heap (~40 ms a task; bench/task_overhead.py).
    assert all(count > 1000 for count in frozen), frozen

    def fails(_: int) -> int:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        WorkerTask(fails)(1)


def _user_error_once_per_attempt(flag_dir: str) -> int:
    attempt = len(os.listdir(flag_dir))
    with open(os.path.join(flag_dir, f"attempt-{attempt}"), "w"):
        pass
    raise LmforgeError("data/raw/part-00003.parquet is corrupt; rerun `dvc repro -f ingest`")


def test_a_user_error_is_raised_once_not_retried(tmp_path):
    # Bad input gives the same error on every attempt: Dask's retries are for workers that die.
    assert isinstance(WorkerTask(_user_error_once_per_attempt)(str(tmp_path)), UserError)
    for stale in tmp_path.iterdir():
        stale.unlink()
    with dask_client(EngineParams(workers=1)) as client:
        with pytest.raises(LmforgeError, match="part-00003.parquet is corrupt"):
            map_tasks(client, _user_error_once_per_attempt, [str(tmp_path)], desc="test")
    assert len(list(tmp_path.iterdir())) == 1


def test_output_md5s_come_from_the_workers_and_hold_until_a_file_changes(tmp_path, monkeypatch):
    # A data stage's output tags need DVC's md5 of every part: the driver must not read them all.
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    for name, size in (("part-00000.parquet", 3000), ("train/shard-00000.arrow", 5000), ("manifest.json", 40)):
        (out / name).write_bytes(os.urandom(size))
    expected = lineage.content_hash(out)
    with dask_client(EngineParams(workers=1)) as client:
        hash_on_workers(client, out)

    def driver_reads(path):
        raise AssertionError(f"the driver read {path}")

    monkeypatch.setattr(digests, "file_md5", driver_reads)
    assert lineage.content_hash(out) == expected
    (out / "manifest.json").write_bytes(b"changed after it was hashed")
    with pytest.raises(AssertionError, match="the driver read .*manifest.json"):
        lineage.content_hash(out)
    monkeypatch.undo()
    assert lineage.content_hash(out) != expected
