"""The data stages' engine: an embedded Dask cluster of processes, results in input order,
a clear error for a scheduler that is not there, and completion markers."""

from __future__ import annotations

import os
import socket
import weakref

import pytest

from lmforge.data.markers import completed, mark_completed, task_key
from lmforge import lineage
from lmforge.engine import UserError, WorkerTask, dask_client, hash_on_workers, map_tasks, worker_count
from lmforge.errors import LmforgeError
from lmforge.params import EngineParams


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


def test_a_scheduler_that_is_not_there_is_one_clear_error(monkeypatch):
    monkeypatch.setattr("lmforge.engine.CONNECT_TIMEOUT_S", 2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(LmforgeError, match=rf"engine.address tcp://127.0.0.1:{port}: no Dask scheduler"):
        with dask_client(EngineParams(address=f"tcp://127.0.0.1:{port}")):
            pass


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

    def task(n: int) -> int:
        cycle = _Cycle()
        refs.append(weakref.ref(cycle))
        return n * 2

    assert WorkerTask(task)(21) == 42
    assert refs[0]() is None

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

    monkeypatch.setattr(lineage, "file_md5", driver_reads)
    assert lineage.content_hash(out) == expected
    (out / "manifest.json").write_bytes(b"changed after it was hashed")
    with pytest.raises(AssertionError, match="the driver read .*manifest.json"):
        lineage.content_hash(out)
    monkeypatch.undo()
    assert lineage.content_hash(out) != expected
