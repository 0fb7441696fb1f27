"""The clean stage on a real Dask engine: the same bytes on 2 workers as in one process, a worker process
killed mid-task loses and doubles nothing, and a stage killed after some partitions resumes
from them and ends with what an uninterrupted run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lmforge.data.clean_job import CleanJob
from lmforge.data.engine import FAULT_ENV
from lmforge.data.engine import dask_client
from lmforge.data import job
from lmforge.data.job import Engine
from lmforge.data.partitions import iter_dataset_batches
from lmforge.core.params import CleanParams, EngineParams

from conftest import make_repo, make_texts, tool_env, tiny_params
from test_clean import EXTRAS, _docs, run_clean, tricky_texts, write_raw

PARAMS = CleanParams(batch_size=100)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Six partitions with duplicates inside and across them."""
    long = make_texts(1, seed=20, words_per_doc=(300, 300))[0]
    texts = [long] + make_texts(900, seed=21) + tricky_texts(200, seed=22)
    base = long.split()
    texts += [" ".join(base[:150] + ["zebra"] + base[151:]), texts[3].upper(), texts[500] + " !"]
    directory = tmp_path_factory.mktemp("raw") / "raw"
    write_raw(directory, _docs(texts), parts=6)
    return directory


def outputs(root: Path, result: dict) -> dict:
    """What a clean run leaves: its parts' bytes, manifest, samples, and stats without timings."""
    out = root / "clean"
    return {
        "parts": {path.name: path.read_bytes() for path in sorted(out.glob("part-*.parquet"))},
        "manifest": json.loads((out / "manifest.json").read_text()),
        "samples": result["samples"],
        "stats": {key: value for key, value in result["stats"].items() if key not in EXTRAS},
    }


def clean_on_dask(raw: Path, root: Path, workers: int) -> dict:
    with dask_client(EngineParams(workers=workers)) as client:
        result = run_clean(PARAMS, raw, root / "clean", root / "staging", Engine(client))
    return outputs(root, result)


@pytest.fixture(scope="module")
def serial(raw, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serial")
    return outputs(root, run_clean(PARAMS, raw, root / "clean", root / "staging"))


def test_two_workers_write_the_bytes_of_one_process(raw, serial, tmp_path):
    # Deduplication across partitions on workers that each see some (a 1-worker cluster: tests/test_data_engine.py)
    assert clean_on_dask(raw, tmp_path / "two", workers=2) == serial
    assert serial["stats"]["steps"]["near_dedup"]["dropped"] >= 1 and serial["stats"]["steps"]["exact_dedup"]["dropped"] >= 2
    assert len(serial["parts"]) == 6


def test_one_partition_is_cleaned_in_the_driver_with_the_bytes_of_a_cluster(raw, tmp_path, monkeypatch):
    """One raw partition: the stage's engine params start no cluster (nothing to share between two
    workers), and the driver writes what the cluster's workers write."""
    one = tmp_path / "raw"
    write_raw(one, [doc for batch in iter_dataset_batches(raw, 1000, "ingest") for doc in batch], parts=1)
    on_cluster = clean_on_dask(one, tmp_path / "cluster", workers=2)
    monkeypatch.setattr(job, "dask_client", lambda params: pytest.fail(f"a cluster was started for {params}"))
    result = run_clean(PARAMS, one, tmp_path / "driver/clean", tmp_path / "driver/staging", EngineParams(workers=2))
    assert outputs(tmp_path / "driver", result) == on_cluster and result["stats"]["workers"] == 0
    assert len(on_cluster["parts"]) == 1 and on_cluster["stats"]["steps"]["exact_dedup"]["dropped"] >= 2


def test_a_worker_killed_mid_task_is_retried_and_nothing_is_lost_or_doubled(raw, serial, tmp_path, monkeypatch):
    flag = tmp_path / "crashed"
    monkeypatch.setenv(FAULT_ENV, f"clean:1:exit:{flag}")  # the workers inherit it when they start
    assert clean_on_dask(raw, tmp_path / "run", workers=2) == serial
    assert flag.is_file()  # a worker did exit in the middle of a task


def _markers(root: Path) -> list[Path]:
    return sorted((root / "data/.staging/clean/.done").glob("map-*.json"))


def test_a_killed_stage_resumes_from_its_finished_partitions_and_ends_as_an_uninterrupted_run(tmp_path):
    # Two workers: with one, the driver would run the tasks itself (test_data_job.py), and this is the cluster's test.
    root = make_repo(tmp_path / "repo", tiny_params(clean={"batch_size": PARAMS.batch_size}, engine={"workers": 2}),
                     n_docs=2)
    write_raw(root / "data/raw", _docs(make_texts(2400, seed=23)), parts=12)
    process = subprocess.Popen(["python", "-m", "stages.clean"], cwd=root, env=tool_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_markers(root)) < 3 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        # The stage and its Dask workers: one process group, as a machine going down takes them all.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finished = len(_markers(root))
    assert 3 <= finished < 12 and not (root / "data/clean/manifest.json").exists()

    rerun = subprocess.run(["python", "-m", "stages.clean"], cwd=root, env=tool_env(), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    resumed = int(rerun.stderr.split("resumed: ")[1].split(" of 12 ")[0])
    assert resumed >= finished
    stats = json.loads((root / "data/clean/stats.json").read_text())
    uninterrupted = outputs(tmp_path / "fresh", run_clean(PARAMS, root / "data/raw", tmp_path / "fresh/clean",
                                                           tmp_path / "fresh/staging"))
    samples = [json.loads(line) for line in (root / "data/clean/rejected_samples.jsonl").read_text().splitlines()]
    assert outputs(root / "data", {"stats": stats, "samples": samples}) == uninterrupted and stats["workers"] == 2
    assert not (root / "data/.staging/clean").exists()


def test_a_rerun_redoes_only_the_partitions_whose_input_or_params_changed(tmp_path, caplog):
    docs = _docs(make_texts(300, seed=24))
    write_raw(tmp_path / "raw", docs, parts=3)
    staging = tmp_path / "staging"

    def tasks_only(params: CleanParams) -> None:
        """The job's tasks without the driver's ending: staging kept, as after a killed run."""
        job = CleanJob(params, tmp_path / "raw", tmp_path / "first/clean", staging)
        job.run(job.plan(), Engine())

    tasks_only(PARAMS)
    write_raw(tmp_path / "raw", docs[:250] + _docs(make_texts(50, seed=25)), parts=3)  # the last part changes
    with caplog.at_level("INFO", logger="lmforge.clean"):
        again = run_clean(PARAMS, tmp_path / "raw", tmp_path / "again/clean", staging)
    assert "resumed: 2 of 3 partitions" in caplog.text
    fresh = run_clean(PARAMS, tmp_path / "raw", tmp_path / "fresh/clean", tmp_path / "fresh-staging")
    assert outputs(tmp_path / "again", again) == outputs(tmp_path / "fresh", fresh)
    tasks_only(PARAMS)
    caplog.clear()
    with caplog.at_level("INFO", logger="lmforge.clean"):
        run_clean(PARAMS.model_copy(update={"min_words": 5}), tmp_path / "raw", tmp_path / "other/clean", staging)
    assert "resumed" not in caplog.text
