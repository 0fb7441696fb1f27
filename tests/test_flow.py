"""The Prefect flow `lmforge-pipeline` end to end on a tiny repository: real DVC, a real Prefect
server (prefect_test_harness), a real `mlflow server` on loopback (no mocks).

The pipeline runs once (module fixture) and then again: all cached, an override, a failing stage;
the tests read what those runs left in MLflow, Prefect and the repository. Evaluate runs light
(conftest.light_params): no test here reads the harness or the from-scratch fine-tune."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.dvc_repo import dvc_stages
from flows.cli import check_prefect_api
from flows.pipeline import CACHED, FLOW_NAME, SKIPPED, pipeline
from flows.summary import SUMMARY_KEY
from lmforge.train.launch import command
from lmforge.core.params import DataParams
from lmforge.track.runs import stage_run
from lmforge.track.store import LOGGING_FAILED_MARKER, check_tracking_server

from conftest import light_params, make_repo, tool_env

ALL = ["ingest", "clean", "tokenize", "pretrain", "finetune_data", "finetune", "evaluate", "promote"]
OVERRIDE_BATCH = 20  # tokenizer.encode_batch_size (TINY_PARAMS: 50): tokenize reruns, writing the same bytes
QUIET = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
         "DVC_NO_ANALYTICS": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args} exited with {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def mlflow_started(tmp_path_factory):
    """A real `mlflow server` on a free loopback port, with its own sqlite store, started but maybe
    not answering yet: (process, URI). Tests ask for mlflow_uri."""
    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home}/m.db", "--artifacts-destination", (home / "art").as_uri()],
        # as the team stack's: without MLflow's GenAI job workers (seven processes importing MLflow)
        cwd=home, env=tool_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **QUIET), stdout=open(home / "server.log", "w"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@pytest.fixture(scope="module")
def mlflow_uri(mlflow_started):
    """The module's `mlflow server`, answering."""
    process, uri = mlflow_started
    wait_healthy(f"{uri}/health", process)
    return uri


@pytest.fixture(scope="module")
def prefect_server(mlflow_started):
    # After mlflow_started: the MLflow server boots while the harness starts Prefect's (each takes
    # seconds to tens of seconds on 2 cores), not one after the other. Ask for it before mlflow_uri.
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def env_mlflow(mlflow_uri):
    """MLFLOW_TRACKING_URI for the flow and the stage processes it starts (restored after)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", *QUIET)}
    os.environ.update(MLFLOW_TRACKING_URI=mlflow_uri, **QUIET)
    yield mlflow_uri
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _run(root: Path, **kwargs) -> dict:
    started = time.perf_counter()
    state = pipeline(root=str(root), return_state=True, **kwargs)
    out = {"state": state, "seconds": time.perf_counter() - started,
           "flow_run_id": str(state.state_details.flow_run_id), "error": None, "result": None}
    if state.is_completed():
        out["result"] = state.result()
    else:
        try:
            state.result()
        except Exception as exc:  # noqa: BLE001 - the flow's own error, checked by the tests
            out["error"] = str(exc)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_server, env_mlflow):
    """The tiny pipeline: from scratch, again (all cached), with an override, with a failing one."""
    root = make_repo(tmp_path_factory.mktemp("flow_repo"), light_params())
    first = _run(root)
    second = _run(root)
    override = _run(root, overrides=[f"tokenizer.encode_batch_size={OVERRIDE_BATCH}"])
    lock_before = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    failing = _run(root, overrides=["clean.min_words=100000"])
    lock_after = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {"root": root, "first": first, "second": second, "override": override, "failing": failing,
            "lock_before": lock_before, "lock_after": lock_after}


def _statuses(run: dict) -> dict[str, str]:
    return {r["stage"]: r["status"] for r in run["result"]["stages"]}


def _client(uri: str) -> MlflowClient:
    return MlflowClient(uri)


def _pipeline_runs(uri: str) -> dict:
    client = _client(uri)
    experiment = client.get_experiment_by_name("lmforge")
    return {r.info.run_id: r for r in client.search_runs([experiment.experiment_id], max_results=500)}


def test_stage_order_is_read_from_dvc(tmp_path):
    root = make_repo(tmp_path)
    order, upstream, metrics = dvc_stages(root)
    assert order == ALL
    assert upstream["pretrain"] == ["clean", "ingest", "tokenize"]
    assert metrics["pretrain"] == ["reports/pretrain/metrics.json"]


def test_first_run_runs_every_stage_nested_under_one_pipeline_run(runs, mlflow_uri):
    first = runs["first"]
    assert first["state"].is_completed(), first["error"]
    assert _statuses(first) == {name: "ran" for name in ALL}
    by_id = _pipeline_runs(mlflow_uri)
    parent = by_id[first["result"]["mlflow_run_id"]]
    assert parent.info.run_name == "pipeline" and parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.source.git.commit"] not in ("", "unknown")
    assert parent.data.tags["lmforge.prefect_flow_run_id"] == first["flow_run_id"]
    assert {parent.data.tags[f"stage.{name}"] for name in ALL} == {"ran"}
    children = {r.data.tags["lmforge.stage"]: r for r in by_id.values()
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == sorted(ALL)
    assert all(r.data.tags["lmforge.prefect_flow_run_id"] == first["flow_run_id"] for r in children.values())
    assert children["pretrain"].data.metrics["pretrain/train_loss"] > 0
    assert children["evaluate"].data.metrics
    assert first["result"]["metrics"]["pretrain"]["steps"] == 6


def test_second_run_is_all_cache_hits_but_promote(runs, mlflow_uri):
    second = runs["second"]
    assert second["state"].is_completed(), second["error"]
    # promote is always_changed (it reads the registry, which DVC cannot see): it runs every time
    assert _statuses(second) == {**{name: SKIPPED for name in ALL}, "promote": "ran"}
    parent = _pipeline_runs(mlflow_uri)[second["result"]["mlflow_run_id"]]
    assert {parent.data.tags[f"stage.{name}"] for name in ALL if name != "promote"} == {SKIPPED}
    nested = [r.data.tags["lmforge.stage"] for r in _pipeline_runs(mlflow_uri).values()
              if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert nested == ["promote"]  # a cache hit logs nothing new


def test_the_parent_run_links_every_stage_and_carries_the_headline_and_key_params(runs, mlflow_uri):
    """Fresh and all-cached alike, `stage.<name>.run_id` and the description point at the runs that
    produced the outputs in the workspace: for the second flow, the first flow's runs (but promote's own)."""
    by_id = _pipeline_runs(mlflow_uri)
    first, second, override = (by_id[runs[key]["result"]["mlflow_run_id"]] for key in ("first", "second", "override"))
    made = {r.data.tags["lmforge.stage"]: r.info.run_id for r in by_id.values()
            if r.data.tags.get("mlflow.parentRunId") == first.info.run_id}
    assert sorted(made) == sorted(ALL)
    evaluate = runs["first"]["result"]["metrics"]["evaluate"]
    promoted_again = {r.data.tags["lmforge.stage"]: r.info.run_id for r in by_id.values()
                      if r.data.tags.get("mlflow.parentRunId") == second.info.run_id}
    for parent, linked in ((first, made), (second, {**made, **promoted_again})):
        assert {name: parent.data.tags.get(f"stage.{name}.run_id") for name in ALL} == linked
        note = parent.data.tags["mlflow.note.content"]
        assert all(f"(#/experiments/{parent.info.experiment_id}/runs/{linked[name]}?workflowType=machine_learning)" in note
                   for name in ALL)
        assert "| test accuracy |" in note
        assert parent.data.metrics["evaluate/accuracy"] == evaluate["accuracy"]
        assert parent.data.metrics["evaluate/baselines.majority_accuracy"] == evaluate["baselines.majority_accuracy"]
        assert {"pretrain/val_loss", "pretrain/unigram_entropy", "tokenize/train.tokens",
                "clean/documents_out"} <= set(parent.data.metrics)
        assert parent.data.params["model.preset"] == "tiny" and parent.data.params["finetune.task"] == "classify"
    # The override reran tokenize (and promote, which always runs): those link to its own runs, the
    # ones DVC found unchanged to the first flow's.
    reran = {r.data.tags["lmforge.stage"]: r.info.run_id for r in by_id.values()
             if r.data.tags.get("mlflow.parentRunId") == override.info.run_id}
    assert sorted(reran) == ["promote", "tokenize"]
    assert {name: override.data.tags[f"stage.{name}.run_id"] for name in ALL} == {**made, **reran}
    assert override.data.params["tokenizer.encode_batch_size"] == str(OVERRIDE_BATCH)


def test_override_reruns_the_stage_and_downstream_and_is_a_dvc_experiment(runs):
    override = runs["override"]
    assert override["state"].is_completed(), override["error"]
    # Documents per encoder call change no byte of the tokenizer or the shards: tokenize reruns (its
    # params changed), and DVC itself skips every stage after it, which `dvc status` could not know
    # before tokenize ran; promote always runs.
    assert _statuses(override) == {
        "ingest": SKIPPED, "clean": SKIPPED, "tokenize": "ran", "pretrain": SKIPPED,
        "finetune_data": SKIPPED, "finetune": SKIPPED, "evaluate": SKIPPED, "promote": "ran",
    }
    assert runs["lock_before"]["tokenize"]["params"]["params.yaml"]["tokenizer"]["encode_batch_size"] == OVERRIDE_BATCH
    experiment = override["result"]["experiment"]
    assert experiment
    listed = subprocess.run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], cwd=runs["root"],
                            env=tool_env(), capture_output=True, text=True, check=True).stdout.split()
    assert experiment in listed


def test_failing_stage_fails_the_flow_with_its_error_and_runs_nothing_after(runs, mlflow_uri):
    failing = runs["failing"]
    assert failing["state"].is_failed()
    assert failing["error"].startswith("[clean] error: all 200 documents were dropped")
    assert runs["lock_after"]["tokenize"] == runs["lock_before"]["tokenize"]  # later stages not run
    assert (runs["root"] / "data/raw/manifest.json").is_file()  # earlier outputs kept
    parents = [r for r in _pipeline_runs(mlflow_uri).values()
               if r.data.tags.get("lmforge.prefect_flow_run_id") == failing["flow_run_id"]
               and r.info.run_name == "pipeline"]
    (parent,) = parents
    assert parent.info.status == "FAILED" and parent.data.tags["stage.clean"] == "failed"
    assert "stage.tokenize" not in parent.data.tags


def test_cache_hits_end_in_a_state_named_cached_and_stages_that_ran_in_completed(runs):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def states(run: dict) -> dict[str, str]:
        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[run["state"].state_details.flow_run_id])))
        assert all(t.state.is_completed() for t in task_runs)  # a cache hit is still COMPLETED to Prefect
        return {t.name: t.state.name for t in task_runs}

    assert states(runs["first"]) == {name: "Completed" for name in ALL}
    # `dvc status` said so: DVC not started (promote is always_changed: it ran)
    assert states(runs["second"]) == {**{name: CACHED for name in ALL}, "promote": "Completed"}
    # after tokenize ran, DVC itself decided that pretrain was unchanged (`dvc status` had it stale)
    expected = {name: CACHED if status == SKIPPED else "Completed" for name, status in _statuses(runs["override"]).items()}
    assert states(runs["override"]) == expected and expected["pretrain"] == CACHED


def _summary(run: dict) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[SUMMARY_KEY]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[run["state"].state_details.flow_run_id]),
        ))
    (artifact,) = artifacts
    assert artifact.type == "markdown"
    return artifact.data


def test_summary_artifact_leads_with_the_model_against_its_baselines_and_links_mlflow(runs, mlflow_uri):
    first = runs["first"]
    markdown = _summary(first)
    experiment = MlflowClient(mlflow_uri).get_experiment_by_name("lmforge").experiment_id
    assert first["result"]["mlflow_url"] == (f"{mlflow_uri}/#/experiments/{experiment}/runs/"
                                             f"{first['result']['mlflow_run_id']}?workflowType=machine_learning")
    assert f"]({first['result']['mlflow_url']})" in markdown
    assert f"]({mlflow_uri}/#/experiments/{experiment}/runs?workflowType=machine_learning)" in markdown
    headline = markdown[markdown.index("|"):markdown.index("\n\n", markdown.index("|"))].splitlines()
    assert headline[0] == "| figure | model | baseline | from stage |"
    figures = {row.split("|")[1].strip(): row for row in headline[2:]}
    assert "unigram " in figures["val loss (nats/token)"] and "majority class " in figures["test accuracy"]
    assert {"val loss at the end of pretraining", "fine-tuning best val loss"} <= set(figures)
    assert markdown.index("| figure |") < markdown.index("| pretrain | ran |") < markdown.index("<summary>pretrain")
    figures_text = "\n".join(line for line in markdown.splitlines() if not line.startswith("MLflow"))  # ids are hex
    assert not re.search(r"\b\d+(\.\d+)?[eE][+-]?\d+\b", figures_text)  # no number with an exponent
    assert "| pretrain | skipped (cache hit) |" in _summary(runs["second"])


def test_unknown_override_key_fails_naming_it(runs):
    bad = _run(runs["root"], overrides=["tokenizer.vocab_sise=300"])
    assert bad["state"].is_failed()
    assert "unknown key 'tokenizer.vocab_sise'" in bad["error"]


def test_unknown_stage_fails_naming_it(runs):
    bad = _run(runs["root"], stages=["pretrian"])
    assert bad["state"].is_failed() and "unknown stage(s) pretrian" in bad["error"]


def test_unreachable_tracking_server_fails_fast_naming_it(runs, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    bad = _run(runs["root"])
    assert bad["state"].is_failed() and bad["seconds"] < 30
    assert f"MLFLOW_TRACKING_URI={uri} does not answer" in bad["error"]
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    assert "PREFECT_API_URL" in check_prefect_api(timeout=2)


def test_stage_run_survives_an_unreachable_server(tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    assert f"MLFLOW_TRACKING_URI={uri}" in check_tracking_server(timeout=2)
    with stage_run("ingest", {"data": DataParams()}, inputs=[], root=tmp_path) as run:
        run.log_metrics({"documents": 3})
        (tmp_path / "out.txt").write_text("done")  # the stage's work still happens
    assert (tmp_path / "out.txt").read_text() == "done" and run.failed
    err = capsys.readouterr().err
    assert err.count(LOGGING_FAILED_MARKER) == 1 and f"MLFLOW_TRACKING_URI={uri}" in err


def test_serve_registers_the_nightly_deployment_with_its_cron(runs, tmp_path):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.pipeline", "serve", "--cron", "0 3 * * *"],
        cwd=Path(__file__).resolve().parents[1], env=tool_env(PREFECT_API_URL=api, **QUIET),
        stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline, deployment = time.monotonic() + 120, None
        with get_client(sync_client=True) as client:
            while deployment is None and time.monotonic() < deadline:
                assert process.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    deployment = client.read_deployment_by_name(f"{FLOW_NAME}/nightly")
                except Exception:  # noqa: BLE001 - not registered yet
                    time.sleep(0.5)
        assert deployment is not None, (tmp_path / "serve.log").read_text()
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    finally:
        stop(process)


def test_launch_runs_one_process_in_place_and_n_through_torchrun(tmp_path):
    """One process: the stage runs in the launcher's own process. Several: torchrun's command (the
    stage run that way, two ranks: test_launch_nodes' one-node reference)."""
    (tmp_path / "hello_stage.py").write_text(
        "import os, pathlib\n"
        "rank = os.environ.get('RANK', 'solo')\n"
        "pathlib.Path(f'rank-{rank}-pid-{os.getpid()}').write_text(os.environ.get('WORLD_SIZE', '1'))\n"
    )
    env = tool_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{Path(__file__).resolve().parents[1]}")
    one = subprocess.run([sys.executable, "-c", "import os, lmforge.train.launch as l; print(os.getpid()); "
                          "l.main(['--nproc', '1', 'hello_stage'])"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    assert [p.name for p in tmp_path.glob("rank-*")] == [f"rank-solo-pid-{one.stdout.strip()}"]  # in-process
    assert command("stages.pretrain", 2)[1:6] == ["-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node=2", "-m"]


def test_a_second_run_on_a_locked_repository_says_so(runs):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from dvc.repo import Repo; r = Repo('.'); r.lock.lock(); "
                               "print('locked', flush=True); time.sleep(120)"],
        cwd=runs["root"], env=tool_env(), stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        bad = _run(runs["root"])
        assert bad["state"].is_failed()
        assert bad["error"].startswith("Unable to acquire lock") and "another DVC process" in bad["error"]
    finally:
        stop(holder)


def test_prefect_yaml_declares_the_nightly_deployment_on_a_work_pool():
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())
    (deployment,) = config["deployments"]
    assert deployment["name"] == "nightly" and deployment["work_pool"]["name"] == "lmforge"
    assert [s["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
    root = Path(__file__).resolve().parents[1]
    assert load_flow_from_entrypoint(str(root / deployment["entrypoint"])).name == FLOW_NAME
