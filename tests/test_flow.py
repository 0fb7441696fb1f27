"""The Prefect flow `lmforge-pipeline` on a tiny repository: real DVC, a real Prefect server
(prefect_test_harness, through conftest.prefect_harness), MLflow's embedded store (no mocks).

The flow runs on a copy of the session's tiny pipeline (`make run`: every stage ran, its runs in the
embedded store): all cached, with an override, with a failing stage; the tests read what those runs
left in MLflow, Prefect and the repository. A flow running every stage, against an MLflow server, is
tests/test_deploy.py's nightly run (test_the_run_ran_every_stage_in_a_completed_task_nested_under_its_pipeline_run);
the fixtures mlflow_started, mlflow_uri and prefect_server are tests/test_flow_faults.py's too."""

from __future__ import annotations

import json
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

from flows.dvc_repo import dvc_stages
from flows.cli import check_prefect_api
from flows.pipeline import CACHED, FLOW_NAME, SKIPPED, pipeline
from flows.summary import SUMMARY_KEY
from lmforge.train.launch import command
from lmforge.core.params import DataParams
from lmforge.track.runs import stage_run
from lmforge.track.store import LOGGING_FAILED_MARKER, check_tracking_server

from conftest import copy_repo, make_repo, prefect_harness, store_client, store_runs, tool_env

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
    """A Prefect server for a module that also logs to mlflow_uri (tests/test_flow_faults.py). After
    mlflow_started: the MLflow server boots while the harness starts Prefect's (each takes seconds to
    tens of seconds on 2 cores), not one after the other. Ask for it before mlflow_uri."""
    with prefect_harness():
        yield


@pytest.fixture(scope="module")
def prefect_alone():
    """A Prefect server, for this module's flows (their runs go to the workspace's embedded store)."""
    with prefect_harness():
        yield


@pytest.fixture(scope="module")
def quiet_env():
    """QUIET for the flow and the stage processes it starts (restored after)."""
    saved = {k: os.environ.get(k) for k in QUIET}
    os.environ.update(QUIET)
    yield
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
def runs(tmp_path_factory, tiny_repo, prefect_alone, quiet_env):
    """The tiny pipeline as `make run` left it, then the flow on it: all cached, with an override,
    with a failing one."""
    root = copy_repo(tiny_repo, tmp_path_factory.mktemp("flow_repo") / "repo")
    cached = _run(root)
    override = _run(root, overrides=[f"tokenizer.encode_batch_size={OVERRIDE_BATCH}"])
    lock_before = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    failing = _run(root, overrides=["clean.min_words=100000"])
    lock_after = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {"root": root, "cached": cached, "override": override, "failing": failing,
            "lock_before": lock_before, "lock_after": lock_after}


def _statuses(run: dict) -> dict[str, str]:
    return {r["stage"]: r["status"] for r in run["result"]["stages"]}


def _pipeline_runs(root: Path) -> dict:
    return {r.info.run_id: r for r in store_runs(root)}


def _children(by_id: dict, parent_id: str | None) -> dict[str, str]:
    """stage -> run id of the runs nested under `parent_id` (None: the runs `make run` made, under none)."""
    return {r.data.tags["lmforge.stage"]: r.info.run_id for r in by_id.values()
            if r.data.tags.get("mlflow.parentRunId") == parent_id and r.info.run_name != "pipeline"}


def test_stage_order_is_read_from_dvc(tmp_path):
    root = make_repo(tmp_path)
    order, upstream, metrics = dvc_stages(root)
    assert order == ALL
    assert upstream["pretrain"] == ["clean", "ingest", "tokenize"]
    assert metrics["pretrain"] == ["reports/pretrain/metrics.json"]


def test_a_flow_after_make_run_is_all_cache_hits_but_promote(runs):
    cached = runs["cached"]
    assert cached["state"].is_completed(), cached["error"]
    # promote is always_changed (it reads the registry, which DVC cannot see): it runs every time
    assert _statuses(cached) == {**{name: SKIPPED for name in ALL}, "promote": "ran"}
    by_id = _pipeline_runs(runs["root"])
    parent = by_id[cached["result"]["mlflow_run_id"]]
    assert parent.info.run_name == "pipeline" and parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.source.git.commit"] not in ("", "unknown")
    assert parent.data.tags["lmforge.prefect_flow_run_id"] == cached["flow_run_id"]
    assert {parent.data.tags[f"stage.{name}"] for name in ALL if name != "promote"} == {SKIPPED}
    (promote,) = [by_id[i] for i in _children(by_id, parent.info.run_id).values()]  # a cache hit logs nothing new
    assert promote.data.tags["lmforge.stage"] == "promote"
    assert promote.data.tags["lmforge.prefect_flow_run_id"] == cached["flow_run_id"]


def test_the_parent_run_links_every_stage_and_carries_the_headline_and_key_params(runs):
    """All-cached or rerun, `stage.<name>.run_id` and the description point at the runs that produced
    the outputs in the workspace: `make run`'s, but for the stages this flow ran."""
    root = runs["root"]
    by_id = _pipeline_runs(root)
    cached, override = (by_id[runs[key]["result"]["mlflow_run_id"]] for key in ("cached", "override"))
    made = _children(by_id, None)
    assert sorted(made) == sorted(ALL)
    evaluate = json.loads((root / "reports" / "metrics.json").read_text())
    promoted_again = _children(by_id, cached.info.run_id)
    # The override reran tokenize (and promote, which always runs): those link to its own runs, the
    # ones DVC found unchanged to `make run`'s.
    reran = _children(by_id, override.info.run_id)
    assert sorted(reran) == ["promote", "tokenize"]
    for parent, linked in ((cached, {**made, **promoted_again}), (override, {**made, **reran})):
        assert {name: parent.data.tags.get(f"stage.{name}.run_id") for name in ALL} == linked
        note = parent.data.tags["mlflow.note.content"]
        assert all(f"(#/experiments/{parent.info.experiment_id}/runs/{linked[name]}?workflowType=machine_learning)" in note
                   for name in ALL)
        assert "| test accuracy |" in note
        assert parent.data.metrics["evaluate/accuracy"] == evaluate["accuracy"]
        assert parent.data.metrics["evaluate/baselines.majority_accuracy"] == evaluate["baselines"]["majority_accuracy"]
        assert {"pretrain/val_loss", "pretrain/unigram_entropy", "tokenize/train.tokens",
                "clean/documents_out"} <= set(parent.data.metrics)
        assert parent.data.params["model.preset"] == "tiny" and parent.data.params["finetune.task"] == "classify"
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


def test_failing_stage_fails_the_flow_with_its_error_and_runs_nothing_after(runs):
    failing = runs["failing"]
    assert failing["state"].is_failed()
    assert failing["error"].startswith("[clean] error: all 200 documents were dropped")
    assert runs["lock_after"]["tokenize"] == runs["lock_before"]["tokenize"]  # later stages not run
    assert (runs["root"] / "data/raw/manifest.json").is_file()  # earlier outputs kept
    parents = [r for r in _pipeline_runs(runs["root"]).values()
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

    # `dvc status` said so: DVC not started (promote is always_changed: it ran)
    assert states(runs["cached"]) == {**{name: CACHED for name in ALL}, "promote": "Completed"}
    # after tokenize ran, DVC itself decided that pretrain was unchanged (`dvc status` had it stale)
    expected = {name: CACHED if status == SKIPPED else "Completed" for name, status in _statuses(runs["override"]).items()}
    assert states(runs["override"]) == expected and expected["pretrain"] == CACHED and expected["tokenize"] == "Completed"


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


def test_summary_artifact_leads_with_the_model_against_its_baselines_and_links_mlflow(runs):
    override, root = runs["override"], runs["root"]
    markdown = _summary(override)
    experiment = store_client(root).get_experiment_by_name("lmforge").experiment_id
    # the embedded store: the links are `mlflow ui`'s, with the command that serves it (a server's own
    # UI: tests/test_deploy.py)
    runs_url = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning"
    run_url = runs_url.replace("/runs?", f"/runs/{override['result']['mlflow_run_id']}?")
    serve = f"cd {root.resolve()} && mlflow ui --backend-store-uri sqlite:///mlflow.db"
    assert override["result"]["mlflow_url"] == f"{run_url} (local store: `{serve}` first)"
    assert f"MLflow (local store): `{serve}`, then open {runs_url} (this run: {run_url})" in markdown
    headline = markdown[markdown.index("|"):markdown.index("\n\n", markdown.index("|"))].splitlines()
    assert headline[0] == "| figure | model | baseline | from stage |"
    figures = {row.split("|")[1].strip(): row for row in headline[2:]}
    assert "unigram " in figures["val loss (nats/token)"] and "majority class " in figures["test accuracy"]
    assert {"val loss at the end of pretraining", "fine-tuning best val loss"} <= set(figures)
    assert markdown.index("| figure |") < markdown.index("| tokenize | ran |") < markdown.index("<summary>tokenize")
    assert "| pretrain | skipped (cache hit) |" in markdown
    figures_text = "\n".join(line for line in markdown.splitlines() if not line.startswith("MLflow"))  # ids are hex
    assert not re.search(r"\b\d+(\.\d+)?[eE][+-]?\d+\b", figures_text)  # no number with an exponent


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
