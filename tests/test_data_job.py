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

from lmforge.core.errors import LmforgeError
from lmforge.core.params import EngineParams
from lmforge.data.documents import DocumentWriter, make_document
from lmforge.data.job import DataJob, Engine, JobResult, run_data_job
from lmforge.data.markers import completed, mark_completed, task_key
from lmforge.data.partitions import iter_dataset_batches, iter_part_batches, part_name, part_paths, write_parts_manifest

from conftest import REPO

DATA_JOB_STAGES = ("ingest", "clean", "tokenize_data")
# What the driver alone does: a stage or a job that does it itself has left the contract.
DRIVER_ONLY = {"dask_client", "hash_on_workers", "clear_staging_dir", "publish", "map_tasks"}


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


def _source(directory: Path) -> Path:
    parts = []
    for index, texts in enumerate([["one a", "two b"], ["three c"]]):
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
