"""A data stage's MLflow run is recorded in the stage and written by the workspace's tracking agent
(lmforge.track.deferred, lmforge.track.agent): the stage process never imports MLflow, the run
that lands is the one the stage would have logged itself (params, metrics, tags, artifacts, status,
its own start and end), a journal no agent wrote is written by the next reader, one MLflow refuses
is set aside with the reason, and each store's journals go only to that store. A training stage's
run is written live (lmforge.track.live): a stage that dies leaves it KILLED, and its resume logs
into the same run. (That a training stage never imports MLflow: test_pretrain_stage.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import tool_env
from lmforge.core.io import write_json
from lmforge.track import deferred, runs
from lmforge.track.deferred import JOURNALS, journal_dir, pending, store_key, wait_for_journals
from lmforge.track.runs import stage_run
from lmforge.track.store import tracking_uri


@pytest.fixture(autouse=True)
def _workspace_store(monkeypatch):
    """Each test's workspace logs to its own embedded store, whatever an earlier test left set."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _runs(root: Path, stage: str) -> list:
    client = MlflowClient(tracking_uri(root))
    experiment = client.get_experiment_by_name("lmforge")
    return client.search_runs([experiment.experiment_id], f"tags.`lmforge.stage` = '{stage}'") if experiment else []


def test_a_data_stage_never_imports_mlflow_and_the_agent_writes_its_whole_run(trained_ready):
    root = trained_ready
    started = time.time()
    stage = subprocess.run([sys.executable, "-X", "importtime", "-m", "stages.finetune_data"], cwd=root,
                           env=tool_env(), capture_output=True, text=True)
    ended = time.time()
    assert stage.returncode == 0, stage.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in stage.stderr.splitlines() if line.startswith("import time:")}
    assert not {"mlflow", "sqlalchemy", "alembic", "pandas"} & imported
    assert "written by the workspace's tracking agent" in stage.stderr

    assert wait_for_journals(root) == []
    (logged,) = _runs(root, "finetune_data")
    assert logged.info.status == "FINISHED"
    # the stage's own times, not the agent's
    assert started * 1000 - 1 <= logged.info.start_time <= logged.info.end_time <= ended * 1000 + 1
    assert "tasks.seed" in logged.data.params and "finetune_data/classify_train" in logged.data.metrics
    assert logged.data.metrics["finetune_data/timings/total_s"] > 0
    assert logged.data.tags["mlflow.source.name"].endswith("stages/finetune_data.py")
    assert any(key.startswith("lmforge.output.data/finetune") for key in logged.data.tags)
    assert logged.data.tags["mlflow.user"] and logged.data.tags["lmforge.input.data/clean"]
    artifacts = {a.path for a in MlflowClient(tracking_uri(root)).list_artifacts(logged.info.run_id)}
    assert {"stats.json", "lineage.json"} <= artifacts
    (directory,) = (root / JOURNALS).iterdir()  # keyed by the stage's store environment, not this process's
    assert [p.name for p in directory.iterdir() if p.suffix in (".json", ".files", ".failed")] == []
    assert re.search(rf"finetune_data\.json: MLflow run {logged.info.run_id} .*FINISHED", (directory / "agent.log").read_text())


def test_a_journal_no_agent_wrote_is_written_before_the_next_logged_run(tmp_path, monkeypatch):
    """An agent killed (or never started) leaves its journals: the next stage that logs in its own
    process starts one and waits, so its run comes after the data stage's, as the stages ran."""
    monkeypatch.setattr(runs, "start_agent", lambda root, directory: None)
    (tmp_path / "stats.json").write_text('{"documents": 3}\n', encoding="utf-8")
    with stage_run("ingest", {"data": {"source": "files"}}, inputs=[], root=tmp_path, deferred=True) as data_run:
        data_run.log_metrics({"documents": 3})
        data_run.log_artifact(tmp_path / "stats.json")
    write_json(tmp_path / "stats.json", {"documents": 99})  # a rerun replaced it (renamed over it, as every output)
    (journal,) = pending(journal_dir(tmp_path, tracking_uri(tmp_path)))
    assert json.loads(journal.read_text())["status"] == "FINISHED"
    assert not (tmp_path / "mlflow.db").exists()

    monkeypatch.setattr(runs, "start_agent", deferred.start_agent)  # agents start again, from the stage below
    with stage_run("promote", {"promote": {}}, inputs=[], root=tmp_path):
        pass
    (ingest,), (promote,) = _runs(tmp_path, "ingest"), _runs(tmp_path, "promote")
    assert ingest.data.metrics["ingest/documents"] == 3 and ingest.info.end_time <= promote.info.start_time
    client = MlflowClient(tracking_uri(tmp_path))
    stats = Path(client.download_artifacts(ingest.info.run_id, "stats.json", str(tmp_path / "down")))
    assert json.loads(stats.read_text()) == {"documents": 3}  # the file as the stage logged it


def test_a_failed_stage_is_recorded_failed_and_a_journal_mlflow_refuses_is_set_aside(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError), stage_run("clean", {"clean": {}}, inputs=[], root=tmp_path, deferred=True):
        raise RuntimeError("a filter crashed")
    assert wait_for_journals(tmp_path, tracking_uri(tmp_path)) == []
    (failed,) = _runs(tmp_path, "clean")
    assert failed.info.status == "FAILED" and not any(k.startswith("lmforge.output.") for k in failed.data.tags)

    monkeypatch.setattr(runs, "start_agent", lambda root, directory: None)
    (tmp_path / "stats.json").write_text("{}\n", encoding="utf-8")
    with stage_run("tokenize", {"tokenizer": {}}, inputs=[], root=tmp_path, deferred=True) as data_run:
        data_run.log_artifact(tmp_path / "stats.json")
    directory = journal_dir(tmp_path, tracking_uri(tmp_path))
    (journal,) = pending(directory)
    for snapshot in journal.with_suffix(".files").rglob("*.json"):
        snapshot.unlink()  # what MLflow is then asked to log is gone
    assert wait_for_journals(tmp_path, tracking_uri(tmp_path)) == []
    assert journal.with_suffix(".failed").is_file() and not journal.exists()
    assert "stats.json" in (directory / "agent.log").read_text()


def test_each_store_gets_only_its_own_journals(tmp_path, monkeypatch):
    """The agent writes with the environment of the stage that started it: a journal for another
    store (another URI or credentials) is neither written by it nor waited for when no agent of its
    own runs."""
    assert store_key("sqlite:///a.db", {}) != store_key("sqlite:///b.db", {})
    assert store_key("s", {"AWS_SECRET_ACCESS_KEY": "x"}) != store_key("s", {"AWS_SECRET_ACCESS_KEY": "y"})
    assert store_key("s", {"HOME": "/a"}) == store_key("s", {"HOME": "/b"})

    monkeypatch.setattr(runs, "start_agent", lambda root, directory: None)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-team")
    with stage_run("ingest", {"data": {}}, inputs=[], root=tmp_path, deferred=True):
        pass
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    (foreign,) = [p for d in (tmp_path / JOURNALS).iterdir() for p in pending(d)]
    started = time.monotonic()
    assert wait_for_journals(tmp_path, tracking_uri(tmp_path), timeout=30) == []
    assert time.monotonic() - started < 5 and foreign.exists() and not _runs(tmp_path, "ingest")



LIVE_STAGE = """
import os, sys
from pathlib import Path
from lmforge.track.runs import stage_run

first, last, end = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
with stage_run("pretrain", {"pretrain": {"lr": 0.001}}, inputs=[], root=Path.cwd(), live_key="key-1") as run:
    for step in range(first, last + 1):
        run.log_metrics({"train_loss": 1.0 / step}, step=step)
    if end == "die":
        os._exit(9)  # a kill -9: no last line
"""


def test_a_live_run_whose_stage_died_is_killed_and_its_resume_logs_into_the_same_run(tmp_path):
    def stage(first: int, last: int, end: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", LIVE_STAGE, str(first), str(last), end], cwd=tmp_path,
                              env=tool_env(), capture_output=True, text=True)

    assert stage(1, 3, "die").returncode == 9
    assert wait_for_journals(tmp_path, tracking_uri(tmp_path)) == []
    (killed,) = _runs(tmp_path, "pretrain")
    assert killed.info.status == "KILLED" and killed.data.tags["lmforge.run_key"] == "key-1"

    resumed = stage(4, 6, "finish")
    assert resumed.returncode == 0, resumed.stderr
    assert wait_for_journals(tmp_path, tracking_uri(tmp_path)) == []
    (finished,) = _runs(tmp_path, "pretrain")
    assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"
    history = MlflowClient(tracking_uri(tmp_path)).get_metric_history(finished.info.run_id, "pretrain/train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    directory = journal_dir(tmp_path, tracking_uri(tmp_path))
    assert sorted(p.name for p in directory.iterdir()) == ["agent.lock", "agent.log"]
    log = (directory / "agent.log").read_text()
    assert f"MLflow run {killed.info.run_id} (pretrain, KILLED)" in log and "(pretrain, FINISHED)" in log
