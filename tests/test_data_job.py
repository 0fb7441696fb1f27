"""The one data-job contract (lmforge/data/job.py): every data stage runs its job through
`run_data_job`, and a fourth job written by filling in the contract gets the same ending (parts
published, stats.json, metrics.json, manifest last, staging cleared). The driver on a Dask engine
is held by the real jobs' tests (test_data_engine.py, test_clean_stage.py); here the tasks run in
this process (lmforge.data.job.Engine without a client), which keeps these tests to a second."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lmforge.core import digests
from lmforge.core.errors import LmforgeError
from lmforge.core.params import EngineParams
from lmforge.data import job as job_module
from lmforge.data.documents import DocumentWriter, make_document
from lmforge.data.job import DataJob, Engine, JobResult, cluster_needed, run_data_job
from lmforge.data.markers import completed, mark_completed, task_key
from lmforge.data.partitions import iter_dataset_batches, iter_part_batches, part_name, part_paths, write_parts_manifest

from conftest import REPO

DATA_JOB_STAGES = ("ingest", "clean", "tokenize_data")
# What the driver alone does: a stage or a job that does it itself has left the contract.
DRIVER_ONLY = {"dask_client", "hash_on_workers", "hash_in_driver", "clear_staging_dir", "publish", "map_tasks"}


def _calls_and_names(path: Path) -> tuple[set[str], set[str]]:
    """(functions called, every name used or imported) in a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    calls = {node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
             for node in ast.walk(tree) if isinstance(node, ast.Call)}
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    return calls, names


def test_every_data_stage_runs_its_job_through_the_one_driver():
    broken = []
    for stage in DATA_JOB_STAGES:
        calls, _ = _calls_and_names(REPO / "stages" / f"{stage}.py")
        if "run_data_job" not in calls:
            broken.append(f"stages/{stage}.py does not call run_data_job")
    modules = sorted((REPO / "stages").glob("*.py")) + sorted((REPO / "lmforge" / "data").glob("*_job.py"))
    for path in modules:
        _, names = _calls_and_names(path)
        if names & DRIVER_ONLY:
            broken.append(f"{path.relative_to(REPO)} uses {sorted(names & DRIVER_ONLY)}: the driver's work "
                          "(lmforge.data.job.run_data_job)")
    assert not broken, "\n".join(broken)


# --- A fourth data job, written by filling in the contract: every text in upper case. ---

def upper_part(task: tuple[int, str, str]) -> dict[str, Any]:
    """One part's texts upper-cased into staging, with a completion marker (a task on a worker)."""
    index, source, staging = task
    name, key = part_name(index), task_key("upper", source)
    if (done := completed(staging, name, key, [Path(staging) / name])) is not None:
        return done
    with DocumentWriter(Path(staging) / name) as writer:
        for batch in iter_part_batches(source, 100, "ingest"):
            writer.write([doc | {"text": doc["text"].upper()} for doc in batch])
    result = {"name": name, "documents": writer.documents, "bytes": writer.bytes}
    mark_completed(staging, name, key, result)
    return result


@dataclass(frozen=True)
class UpperJob(DataJob):
    source: Path
    output: Path
    staging: Path
    fail: bool = False  # the run raises after its tasks (a result the job finds unusable)
    compared = ("documents",)

    @property
    def reports(self) -> Path:
        return self.output

    def plan(self) -> list[tuple[int, str, str]]:
        staging = str(self.staging.resolve())
        return [(index, str(path.resolve()), staging) for index, path in enumerate(part_paths(self.source, "ingest"))]

    def run(self, tasks: list[tuple[int, str, str]], engine: Engine) -> JobResult:
        parts = engine.map(upper_part, tasks, desc="upper")
        if self.fail:
            raise LmforgeError("the upper job found nothing usable")
        stats = {"documents": sum(part["documents"] for part in parts), "workers": engine.workers}
        return JobResult(stats, [self.staging.resolve() / part["name"] for part in parts],
                         lambda output: write_parts_manifest(output, parts))


def _source(directory: Path, partitions: list[list[str]] = [["one a", "two b"], ["three c"]]) -> Path:  # noqa: B006
    parts = []
    for index, texts in enumerate(partitions):
        with DocumentWriter(directory / part_name(index)) as writer:
            writer.write([make_document(text, "test") for text in texts])
        parts.append({"name": part_name(index), "documents": writer.documents, "bytes": writer.bytes})
    write_parts_manifest(directory, parts)
    return directory


def test_a_fourth_data_job_gets_the_contracts_outputs_and_its_staging_cleared(tmp_path):
    job = UpperJob(_source(tmp_path / "source"), tmp_path / "upper", tmp_path / "staging")
    job.output.mkdir()
    (job.output / "part-00009.parquet").write_bytes(b"an earlier run's")
    stats = run_data_job(job, Engine())
    assert stats == {"documents": 3, "workers": 0}
    assert sorted(p.name for p in job.output.iterdir()) == ["manifest.json", "metrics.json", "part-00000.parquet",
                                                            "part-00001.parquet", "stats.json"]
    assert json.loads((job.output / "stats.json").read_text()) == stats
    assert json.loads((job.output / "metrics.json").read_text()) == {"documents": 3}
    texts = [doc["text"] for batch in iter_dataset_batches(job.output, 10, "upper") for doc in batch]
    assert texts == ["ONE A", "TWO B", "THREE C"]
    assert not job.staging.exists()


def test_a_job_whose_plan_fails_starts_no_engine(tmp_path):
    """The plan runs on the driver first: a missing input is its error, not an unreachable engine's."""
    job = UpperJob(tmp_path / "nothing", tmp_path / "upper", tmp_path / "staging")
    with pytest.raises(LmforgeError, match=r"manifest.json not found: run `dvc repro ingest` first"):
        run_data_job(job, EngineParams(address="tcp://127.0.0.1:9"))


def test_a_failed_job_publishes_nothing_and_keeps_its_staging_to_resume_from(tmp_path):
    job = UpperJob(_source(tmp_path / "source"), tmp_path / "upper", tmp_path / "staging", fail=True)
    job.output.mkdir()
    (job.output / "stats.json").write_text("{}")
    with pytest.raises(LmforgeError, match="nothing usable"):
        run_data_job(job, Engine())  # the tasks in this process
    assert [p.name for p in job.output.iterdir()] == ["stats.json"]
    assert sorted(p.name for p in (job.staging / ".done").iterdir()) == ["part-00000.parquet.json",
                                                                        "part-00001.parquet.json"]


@pytest.mark.parametrize("params,partitions,min_workers,cluster", [
    (EngineParams(), 1, 2, False),  # one partition: nothing to share between workers
    (EngineParams(workers=4), 1, 2, False),
    (EngineParams(workers=1), 12, 2, False),  # one worker: the driver runs the tasks as it would
    (EngineParams(workers=2), 2, 2, True),
    (EngineParams(), 2, 2, True),  # null: one per core (2 here)
    (EngineParams(), 2, 3, False),  # a job whose tasks use every core of one process (tokenize)
    (EngineParams(workers=3), 2, 3, True),
    (EngineParams(address="tcp://10.0.0.5:8786"), 1, 2, True),  # a scheduler given is always used
    (EngineParams(address="tcp://10.0.0.5:8786", workers=1), 0, 3, True),
])
def test_the_embedded_cluster_starts_only_with_partitions_and_workers_to_share(params, partitions, min_workers,
                                                                               cluster, monkeypatch):
    monkeypatch.setattr(job_module.os, "cpu_count", lambda: 2)  # engine.workers null: one per core
    assert cluster_needed(params, partitions, min_workers) is cluster


def _no_cluster(params):
    raise AssertionError(f"a Dask cluster was started for {params}")


def test_one_partition_or_one_worker_runs_in_the_driver_and_remembers_the_output_md5s(tmp_path, monkeypatch):
    """No cluster (its start, Dask's import and scheduling cost ~2 s of a tiny stage), the same outputs
    as tasks run anywhere else, `workers` 0 in the stats, and the output tags' md5s known without
    reading the parts again: hashed as they were written."""
    monkeypatch.setattr(job_module, "dask_client", _no_cluster)
    # The parts' md5s are taken as they are written (the small JSON files the driver writes are read).
    monkeypatch.setattr(digests, "file_md5", lambda path: pytest.fail(f"{path} read back for its md5")
                        if str(path).endswith(".parquet") else digests.file_digest(path, "md5"))
    runs = {
        "one partition": (_source(tmp_path / "one", [["one a", "two b", "three c"]]), EngineParams(workers=2)),
        "one worker": (_source(tmp_path / "two"), EngineParams(workers=1)),
    }
    for name, (source, params) in runs.items():
        job = UpperJob(source, tmp_path / name / "upper", tmp_path / name / "staging")
        assert run_data_job(job, params, hash_outputs=True) == {"documents": 3, "workers": 0}
        texts = [doc["text"] for batch in iter_dataset_batches(job.output, 10, "upper") for doc in batch]
        assert texts == ["ONE A", "TWO B", "THREE C"]
        with monkeypatch.context() as reads:
            reads.setattr(digests, "file_md5", lambda path: pytest.fail(f"{path} was read again for its md5"))
            remembered = digests.content_hash(job.output)
        with monkeypatch.context() as forgotten:
            forgotten.setattr(digests, "_KNOWN_MD5", {})  # every file read: the md5s remembered were right
            forgotten.setattr(digests, "file_md5", lambda path: digests.file_digest(path, "md5"))
            assert digests.content_hash(job.output) == remembered


def test_a_one_partition_job_at_an_engine_address_still_goes_there(tmp_path):
    job = UpperJob(_source(tmp_path / "source", [["one a"]]), tmp_path / "upper", tmp_path / "staging")
    with pytest.raises(LmforgeError, match="engine.address tcp://127.0.0.1:9: connection refused"):
        run_data_job(job, EngineParams(address="tcp://127.0.0.1:9"))
