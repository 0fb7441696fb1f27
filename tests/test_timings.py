"""Where a stage's seconds go (lmforge.core.timings): phases add up to the wall, and a stage run with
LMFORGE_TIMINGS=1 prints the breakdown and logs it to MLflow."""

from __future__ import annotations

import re
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import make_repo, run
from lmforge.core import timings


@pytest.fixture(autouse=True)
def _own_clock(monkeypatch):
    """The module's clock put back after each test: a later test's stage_run logs no timings of ours."""
    for name in ("_started", "_startup", "_seconds"):
        monkeypatch.setattr(timings, name, getattr(timings, name) if name != "_seconds" else {})


def test_phases_and_the_rest_add_up_to_the_wall_and_nested_phases_count_once():
    timings.stage_started()
    with timings.phase("engine"):
        time.sleep(0.05)
        with timings.phase("publish"):  # inside engine: counted there only
            time.sleep(0.05)
    with timings.phase("publish"):
        time.sleep(0.02)
    time.sleep(0.03)  # the work
    seconds = timings.breakdown()
    assert seconds["engine"] >= 0.1 and 0.02 <= seconds["publish"] < 0.05
    assert seconds["work"] >= 0.03
    named = sum(v for k, v in seconds.items() if k != "total")
    assert seconds["total"] == pytest.approx(named, abs=0.01)
    assert seconds["startup"] > 0  # this process started before the test


def test_an_unknown_phase_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="unknown timing phase 'warmup'.*startup"):
        with timings.phase("warmup"):
            pass


def test_a_stage_prints_its_breakdown_on_request_and_logs_it_to_its_run(tmp_path):
    root = make_repo(tmp_path / "repo")
    quiet = run(["python", "-m", "stages.ingest"], root)
    assert "timings:" not in quiet.stderr
    loud = run(["python", "-m", "stages.ingest"], root, LMFORGE_TIMINGS="1")
    (line,) = [line for line in loud.stderr.splitlines() if line.startswith("[ingest] timings:")]
    printed = dict((name, float(value)) for name, value in re.findall(r"(\w+) ([\d.]+) s", line))
    assert {"startup", "params", "tracking", "work", "total"} <= set(printed)
    assert printed["total"] == pytest.approx(sum(v for k, v in printed.items() if k != "total"), abs=0.3)
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "lmforge"]
    latest = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    logged = {k.removeprefix("ingest/timings/").removesuffix("_s"): v for k, v in latest.data.metrics.items()
              if k.startswith("ingest/timings/")}
    assert {"startup", "params", "tracking", "work"} <= set(logged) and all(v >= 0 for v in logged.values())


def test_only_rank_zero_prints_the_breakdown(monkeypatch):
    monkeypatch.setenv(timings.TIMINGS_ENV, "1")
    monkeypatch.setenv("RANK", "1")
    assert not timings.wanted()
    monkeypatch.setenv("RANK", "0")
    assert timings.wanted()
    monkeypatch.delenv("RANK")
    assert timings.wanted()
