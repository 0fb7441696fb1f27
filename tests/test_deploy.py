"""The team's path end to end with real processes on loopback: `deploy/local-stack up` (S3 storage,
an MLflow server with its artifacts in the bucket, a Prefect server, a process pool and its worker),
`prefect deploy --name nightly`, `prefect deployment run lmforge-pipeline/nightly` executed by the
worker from its own clone of a bare repository, then what other machines see: MLflow runs and
artifacts, the DVC remote, git, a second clone's `dvc pull`, the registered model from a clean
directory. The stack is stopped at the end, even when a test fails.

One tiny run (module fixture); the tests read what it left. Marked `stack` (minutes: 4.6 to 7.7 on
this 2-core machine shared with other jobs); the two tests at the end need no stack."""

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

import boto3
import httpx
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, light_params, make_repo, run, tool_env
from flows.errors import PipelineError
from flows.pipeline import _stage_env, pipeline
from flows.remote import checkout, publish
from flows.summary import SUMMARY_KEY

STACK = REPO / "deploy" / "local-stack"
ALL = ["ingest", "clean", "tokenize", "pretrain", "finetune_data", "finetune", "evaluate", "promote"]
RUN_TIMEOUT_S = 420


def stack(command: str, home: Path, repo: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(STACK), command, "--dir", str(home), "--repo", str(repo)], cwd=repo,
                          env=tool_env(LMFORGE_PYTHON=sys.executable, **env), capture_output=True, text=True,
                          timeout=timeout)


def exports(text: str) -> dict[str, str]:
    """`export KEY=value` lines (as `env` prints them) as a mapping."""
    return {m.group(1): m.group(2).strip("'") for m in re.finditer(r"^export (\w+)=(.*)$", text, re.M)}


def kill_leftovers(home: Path) -> None:
    """Last resort when `down` failed: SIGKILL every recorded process group."""
    state = home / "stack.json"
    if state.is_file():
        for record in json.loads(state.read_text())["services"].values():
            try:
                os.killpg(record["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for_flow_run(api: str, flow_run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10).json()
        if run.get("state") and run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(0.5)
    raise AssertionError(f"flow run {flow_run_id} not finished after {timeout:.0f} s")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """The stack up, the deployment registered from a developer's checkout whose origin is a bare
    repository, one run triggered and finished by the worker."""
    base = tmp_path_factory.mktemp("deploy")
    home, workspace = base / "stack", make_repo(base / "workspace", light_params())  # no test reads harness/scratch
    origin = base / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(workspace), str(origin)], check=True)
    started = time.perf_counter()
    try:
        # The worker asks the pool for runs every second, not Prefect's default 10 s: the run starts sooner.
        up = stack("up", home, workspace, PREFECT_WORKER_QUERY_SECONDS="1")
        assert up.returncode == 0, up.stdout + up.stderr
        env = exports(stack("env", home, workspace).stdout)
        user = tool_env(**env)
        deploy = subprocess.run([sys.executable, "-m", "prefect", "deploy", "--name", "nightly"], cwd=workspace,
                                env=user | {"LMFORGE_GIT_URL": origin.as_uri()}, capture_output=True, text=True,
                                timeout=120)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        trigger = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "lmforge-pipeline/nightly"],
                                 cwd=workspace, env=user, capture_output=True, text=True, timeout=120)
        assert trigger.returncode == 0, trigger.stdout + trigger.stderr
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", trigger.stdout).group(1)
        flow_run = wait_for_flow_run(env["PREFECT_API_URL"], flow_run_id, RUN_TIMEOUT_S)
        yield {"home": home, "workspace": workspace, "origin": origin, "env": env, "flow_run": flow_run,
               "clone": home / "worker" / "lmforge", "base": base, "up": up.stdout,
               "seconds": time.perf_counter() - started}
    finally:
        down = stack("down", home, workspace, timeout=120)
        if down.returncode != 0:
            kill_leftovers(home)
        assert down.returncode == 0, down.stdout + down.stderr


def worker_log(deployed) -> str:
    return (deployed["home"] / "logs" / "worker.log").read_text(errors="replace")


def s3(env: dict[str, str]):
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])


def keys(env: dict[str, str], bucket: str) -> list[str]:
    pages = s3(env).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.mark.stack
def test_up_starts_every_service_on_loopback_and_env_exports_them(deployed):
    env = deployed["env"]
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
        assert env[key].startswith("http://127.0.0.1:"), env
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "LMFORGE_DVC_REMOTE", "LMFORGE_DVC_REMOTE_URL"} <= set(env)
    status = stack("status", deployed["home"], deployed["workspace"])
    assert status.returncode == 0, status.stdout
    lines = {line.split()[0]: line for line in status.stdout.splitlines()}
    assert all(" up " in lines[name] for name in ("s3", "mlflow", "prefect", "worker")), status.stdout
    assert env["MLFLOW_TRACKING_URI"] in lines["mlflow"] and env["PREFECT_API_URL"] in lines["prefect"]
    assert env["AWS_SECRET_ACCESS_KEY"] not in deployed["up"] + status.stdout  # only `env` prints it
    config = (deployed["workspace"] / ".dvc" / "config.local").read_text()
    assert env["LMFORGE_DVC_REMOTE_URL"] in config and env["AWS_ENDPOINT_URL"] in config
    # The MLflow server alone: none of MLflow's GenAI job workers (huey consumers) beside it.
    server = psutil.Process(load_local_stack().read_state(deployed["home"])["services"]["mlflow"]["pid"])
    commands = [" ".join(child.cmdline()) for child in server.children(recursive=True)]
    assert commands and not [c for c in commands if "huey" in c], commands


@pytest.mark.stack
def test_the_worker_runs_the_deployment_from_its_own_clone(deployed):
    run = deployed["flow_run"]
    assert run["state"]["type"] == "COMPLETED", worker_log(deployed)[-6000:]
    assert run["work_pool_name"] == "lmforge" and run["infrastructure_pid"]  # the process worker started it
    assert f"submitting flow run '{run['id']}'" in worker_log(deployed)
    assert (deployed["clone"] / "dvc.lock").is_file() and (deployed["clone"] / "models" / "finetune").is_dir()
    workspace = deployed["workspace"]
    assert not (workspace / "dvc.lock").exists() and not (workspace / "models").exists()  # developer's untouched
    # the DVC cache and the checkpoints beside the clone, where nothing done to the clone reaches them
    worker, clone = deployed["home"] / "worker", deployed["clone"]
    assert (worker / "dvc-cache" / "files" / "md5").is_dir() and (worker / "checkpoints" / "pretrain").is_dir()
    assert not (clone / ".dvc" / "cache").exists() and not (clone / "checkpoints").exists()
    print(f"stack up + deploy + tiny run by the worker: {deployed['seconds']:.0f} s")


def pipeline_runs(deployed) -> tuple:
    """The stack's experiment `lmforge`, the nightly run's one parent run `pipeline`, the runs nested under it."""
    client = MlflowClient(deployed["env"]["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("lmforge")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.info.run_name == "pipeline"]
    return experiment, parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


@pytest.mark.stack
def test_stage_runs_nest_under_the_pipeline_run_and_artifacts_land_in_the_bucket(deployed):
    experiment, parent, children = pipeline_runs(deployed)
    assert parent.data.tags["lmforge.prefect_flow_run_id"] == deployed["flow_run"]["id"]
    assert sorted(r.data.tags["lmforge.stage"] for r in children) == sorted(ALL)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # served: clients hold no keys
    stored = keys(deployed["env"], "lmforge-artifacts")
    assert any(k.endswith("/MLmodel") for k in stored), stored[:20]  # the registered models
    assert any(k.endswith("/report.md") for k in stored), stored[:20]  # evaluate's report


def api_post(env: dict[str, str], path: str, body: dict) -> list[dict]:
    """A filter query to the stack's Prefect API."""
    response = httpx.post(f"{env['PREFECT_API_URL']}/{path}", json=body, timeout=10)
    response.raise_for_status()
    return response.json()


@pytest.mark.stack
def test_the_run_ran_every_stage_in_a_completed_task_nested_under_its_pipeline_run(deployed):
    """The flow on a fresh clone, every stage run (tests/test_flow.py runs it on a workspace `make run`
    built: cache hits, an override, a failure): Prefect's tasks, the parent run, its links and summary."""
    env, flow_run_id = deployed["env"], deployed["flow_run"]["id"]
    tasks = api_post(env, "task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    states = {"publish" if t["name"].startswith("publish") else t["name"]: t["state"]["name"] for t in tasks}
    assert states == {**{name: "Completed" for name in ALL}, "publish": "Completed"}  # the stages ran, none a cache hit
    experiment, parent, nested = pipeline_runs(deployed)
    assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.source.git.commit"] not in ("", "unknown")
    assert {parent.data.tags[f"stage.{name}"] for name in ALL} == {"ran"}
    children = {r.data.tags["lmforge.stage"]: r for r in nested}
    assert {name: parent.data.tags[f"stage.{name}.run_id"] for name in ALL} == {n: r.info.run_id for n, r in children.items()}
    assert {r.data.tags["lmforge.prefect_flow_run_id"] for r in children.values()} == {flow_run_id}
    assert children["pretrain"].data.metrics["pretrain/train_loss"] > 0 and children["evaluate"].data.metrics
    assert parent.data.metrics["pretrain/steps"] == 6
    (summary,) = api_post(env, "artifacts/filter", {"artifacts": {"key": {"any_": [SUMMARY_KEY]},
                                                                  "flow_run_id": {"any_": [flow_run_id]}}})
    url = (f"{env['MLFLOW_TRACKING_URI']}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}"
           "?workflowType=machine_learning")  # a server: its own UI
    assert f"]({url})" in summary["data"] and "| pretrain | ran |" in summary["data"]


@pytest.mark.stack
def test_the_run_is_published_to_the_dvc_remote_and_git(deployed):
    clone, origin = deployed["clone"], deployed["origin"]
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    hashes = {out["md5"] for stage in lock.values() for out in stage.get("outs", [])}
    # DVC's remote layout: files/md5/<first 2 hex digits>/<the rest> (a directory's listing ends .dir)
    stored = {"".join(k.split("/")[-2:]) for k in keys(deployed["env"], "lmforge-dvc")}
    missing = sorted(h for h in hashes if h not in stored)
    assert hashes and not missing, f"dvc.lock outputs not in the remote: {missing}"
    published = subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=origin, capture_output=True, text=True)
    assert published.returncode == 0, published.stderr
    assert published.stdout == (clone / "dvc.lock").read_text()
    message = subprocess.run(["git", "log", "-1", "--format=%s"], cwd=origin, capture_output=True, text=True).stdout
    assert message.startswith("lmforge-pipeline: dvc.lock of flow run")


@pytest.mark.stack
def test_a_second_clone_pulls_and_finds_every_stage_but_promote_a_cache_hit(deployed):
    second = deployed["base"] / "second"
    subprocess.run(["git", "clone", "-q", deployed["origin"].as_uri(), str(second)], check=True)
    env = tool_env(**deployed["env"])
    pulled = subprocess.run([sys.executable, "-m", "flows.remote", "pull"], cwd=second, env=env,
                            capture_output=True, text=True, timeout=180)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert (second / "models" / "finetune").is_dir() and (second / "reports" / "metrics.json").is_file()
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=second, env=env,
                            capture_output=True, text=True, timeout=180)
    assert status.returncode == 0, status.stdout + status.stderr
    # every stage up to date but promote, which always runs (it reads the registry)
    assert json.loads(status.stdout) == {"promote": ["always changed"]}, status.stdout


@pytest.mark.stack
def test_the_registered_model_loads_from_a_clean_directory_with_only_the_tracking_uri(deployed, tmp_path):
    # The first nightly run's model is the first champion (the promote stage), loaded by its alias.
    client = MlflowClient(deployed["env"]["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("lmforge-finetune", "champion")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": deployed["env"]["MLFLOW_TRACKING_URI"]}
    code = ("import mlflow.pytorch, sys; m = mlflow.pytorch.load_model(sys.argv[1]); "
            "print(type(m).__name__, sum(p.numel() for p in m.parameters()))")
    loaded = subprocess.run([sys.executable, "-c", code, "models:/lmforge-finetune@champion"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=180)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert int(loaded.stdout.split()[-1]) > 0
    assert champion.tags.get("lmforge.weights_md5")


@pytest.mark.stack
def test_no_storage_secret_reaches_the_worker_or_the_flow_logs(deployed):
    secret = deployed["env"]["AWS_SECRET_ACCESS_KEY"]
    assert secret not in worker_log(deployed)
    logs = api_post(deployed["env"], "logs/filter",
                    {"logs": {"flow_run_id": {"any_": [deployed["flow_run"]["id"]]}}, "limit": 200})
    assert logs and not any(secret in entry["message"] for entry in logs)


@pytest.mark.stack
def test_down_stops_every_process_and_frees_every_port(deployed):
    state = json.loads((deployed["home"] / "stack.json").read_text())
    down = stack("down", deployed["home"], deployed["workspace"], timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    for name, record in state["services"].items():
        assert not Path(f"/proc/{record['pid']}").exists() or \
            Path(f"/proc/{record['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", name
        if record.get("port"):
            with socket.socket() as sock:
                assert sock.connect_ex(("127.0.0.1", record["port"])) != 0, f"{name} still listening"
    status = stack("status", deployed["home"], deployed["workspace"])
    assert status.returncode == 1 and "no stack" in status.stdout
    # `up` made the stack the checkout's DVC remote; `down` puts back what was there: no config.local
    assert not (deployed["workspace"] / ".dvc" / "config.local").exists()
    assert "config.local restored" in down.stdout, down.stdout


def test_a_checkout_without_a_remote_is_told_what_to_set(tmp_path):
    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    result = run([sys.executable, "-m", "flows.remote", "pull"], tmp_path, check=False, PYTHONPATH=str(REPO))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: no DVC remote: set LMFORGE_DVC_REMOTE_URL"), result.stderr


def test_push_refuses_overrides_before_anything_runs():
    with pytest.raises(PipelineError, match="takes no overrides"):
        pipeline.fn(overrides=["tokenizer.vocab_size=300"], push=True)


# ------------------------------------------------------------------------- the stack's own faults


def dvc_checkout(root: Path, remote: str | None = None) -> Path:
    """git + DVC in `root`; with `remote`, a default remote `mine` at that URL in .dvc/config.local."""
    root.mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    if remote:
        run(["dvc", "remote", "add", "--local", "--default", "mine", remote], root)
    return root


def load_local_stack():
    """deploy/local_stack.py as a module (deploy/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("local_stack", REPO / "deploy" / "local_stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_port_taken_before_its_server_binds_is_reported_as_such_and_down_finishes(tmp_path):
    workspace = dvc_checkout(tmp_path / "workspace", str(tmp_path / "store"))
    config = workspace / ".dvc" / "config.local"
    before, home = config.read_bytes(), tmp_path / "stack"
    with socket.socket() as taken:  # another program's, on the port the stack's S3 storage is given
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            up = stack("up", home, workspace, timeout=240, LMFORGE_STACK_S3_PORT=str(port))
            down = stack("down", home, workspace, timeout=120)
        finally:
            kill_leftovers(home)
    assert up.returncode == 1, up.stdout + up.stderr
    # the service, its port and the server's own last word; not a failure to stop the others
    assert up.stderr.startswith(f"error: S3 storage exited before it was ready on 127.0.0.1:{port}: "
                                f"Port {port} is in use by another program"), up.stderr
    assert "could not stop" not in up.stderr and "Traceback" not in up.stderr
    assert down.returncode == 0 and "no stack" in down.stdout, down.stdout + down.stderr
    assert config.read_bytes() == before  # a stack that never came up never became the remote


def test_a_second_stack_leaves_a_remote_pointing_at_a_stack_that_is_up_alone(tmp_path, capsys):
    local_stack = load_local_stack()
    workspace = dvc_checkout(tmp_path / "workspace")
    home = tmp_path / "second"
    home.mkdir()
    with socket.socket() as first:  # the first stack's S3 storage, up
        first.bind(("127.0.0.1", 0))
        first.listen()
        endpoint = f"http://127.0.0.1:{first.getsockname()[1]}"
        run(["dvc", "remote", "add", "--local", "--default", "lmforge", "s3://lmforge-dvc/lmforge"], workspace)
        run(["dvc", "remote", "modify", "--local", "lmforge", "endpointurl", endpoint], workspace)
        before = (workspace / ".dvc" / "config.local").read_bytes()
        state = {"repo": str(workspace), "services": {"s3": {"url": "http://127.0.0.1:9"}}}
        local_stack.point_remote(home, state, tool_env())
    assert (workspace / ".dvc" / "config.local").read_bytes() == before
    note = capsys.readouterr().out
    assert note.startswith(f"note: {workspace / '.dvc' / 'config.local'} left as it is") and endpoint in note
    assert local_stack.restore_remote(state) is None  # `down` of the second stack leaves it alone too


def test_down_puts_back_the_dvc_remote_that_was_there_before_up(tmp_path):
    local_stack = load_local_stack()
    workspace = dvc_checkout(tmp_path / "workspace", str(tmp_path / "store"))
    config = workspace / ".dvc" / "config.local"
    before, home = config.read_bytes(), tmp_path / "stack"
    home.mkdir()
    state = {"repo": str(workspace), "keys": {"access_key_id": "k", "secret_access_key": "s"},
             "services": {name: {"url": f"http://127.0.0.1:{local_stack.free_port()}"}
                          for name in ("s3", "mlflow", "prefect")}}
    local_stack.point_remote(home, state, local_stack.base_env() | local_stack.client_env(state))
    assert state["services"]["s3"]["url"] in config.read_text()  # the stack's storage is the remote
    said = local_stack.restore_remote(state)
    assert config.read_bytes() == before and said.endswith("as before `up`"), said


# ------------------------------------------------------------- a worker's clone after a failed push

# A stage that trains in a blink: its output is a DVC directory, its checkpoint goes where
# lmforge.core.paths says (LMFORGE_CHECKPOINTS_DIR on a worker).
TRAIN = """\
from pathlib import Path
from lmforge.core import paths
text = Path("data.txt").read_text()
Path("model").mkdir(exist_ok=True)
Path("model/weights.txt").write_text(text.upper())
paths.PRETRAIN_CHECKPOINTS.mkdir(parents=True, exist_ok=True)
(paths.PRETRAIN_CHECKPOINTS / "step-1").write_text(text)
"""
# prefect.yaml's pull steps, each templated and called as Prefect's run_step does before a flow run
# (less its block and variable look-ups, which need a Prefect server; these steps use none).
PULL_STEPS = """\
import asyncio, inspect, os, sys, yaml
from prefect.utilities.importtools import import_object
from prefect.utilities.templating import apply_values
outputs = {}
for step in yaml.safe_load(open(sys.argv[1]))["pull"]:
    (name, inputs), = step.items()
    inputs = apply_values(apply_values(dict(inputs), outputs), os.environ)
    step_id = inputs.pop("id", None)
    result = import_object(name)(**inputs)
    result = asyncio.run(result) if inspect.isawaitable(result) else result
    if step_id:
        outputs[step_id] = result
"""
GIT_USER = ["-c", "user.name=dev", "-c", "user.email=dev@localhost"]


def make_origin(base: Path) -> Path:
    """A bare repository holding a one-stage DVC project (`train`: data.txt -> model/)."""
    project = base / "project"
    project.mkdir()
    (project / "data.txt").write_text("night one\n")
    (project / "train.py").write_text(TRAIN)
    (project / ".gitignore").write_text("/checkpoints/\n")
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": "python train.py", "deps": ["data.txt", "train.py"], "outs": ["model"]}}}))
    run(["git", "init", "-q", "-b", "main"], project)
    run(["dvc", "init", "-q"], project)
    run(["git", "add", "-A"], project)
    run(["git", *GIT_USER, "commit", "-qm", "project"], project)
    origin = base / "origin.git"
    run(["git", "clone", "-q", "--bare", str(project), str(origin)], base)
    return origin


def worker_env(base: Path, origin: Path, remote: str) -> dict[str, str]:
    """A worker's environment: its directory, the repository, the DVC remote, this checkout's code."""
    return tool_env(PYTHONPATH=str(REPO), LMFORGE_WORKER_DIR=str(base / "worker"), LMFORGE_GIT_URL=origin.as_uri(),
                    LMFORGE_DVC_REMOTE_URL=remote)


def unreachable_remote(base: Path) -> str:
    """A DVC remote no push can reach: a directory under a regular file (even root cannot make it)."""
    (base / "not-a-directory").write_text("")
    return str(base / "not-a-directory" / "remote")


def night_run(clone: Path, env: dict[str, str], monkeypatch) -> dict:
    """The stages of a nightly run, with the environment the flow gives them; returns dvc.lock."""
    if "LMFORGE_WORKER_DIR" in env:
        monkeypatch.setenv("LMFORGE_WORKER_DIR", env["LMFORGE_WORKER_DIR"])
    else:
        monkeypatch.delenv("LMFORGE_WORKER_DIR", raising=False)
    result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=clone, capture_output=True, text=True,
                            env=_stage_env({"PYTHONPATH": str(REPO)}))
    assert result.returncode == 0, result.stdout + result.stderr
    return yaml.safe_load((clone / "dvc.lock").read_text())


def out_hashes(lock: dict) -> set[str]:
    return {out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def stored(directory: Path) -> set[str]:
    """The md5s a DVC cache or local remote holds (files/md5/<2 hex>/<rest>)."""
    return {f"{p.parent.name}{p.name}" for p in (directory / "files" / "md5").glob("*/*")}


def push_to_origin(base: Path, origin: Path, name: str, change) -> str:
    """Another clone (a developer, another worker) changes something and pushes it to origin."""
    other = base / name
    run(["git", "clone", "-q", origin.as_uri(), str(other)], base)
    change(other)
    run(["git", "add", "-A"], other)
    run(["git", *GIT_USER, "commit", "-qm", f"{name}'s change"], other)
    run(["git", "push", "-q", "origin", "HEAD:main"], other)
    return run(["git", "rev-parse", "HEAD"], other).stdout.strip()


def pull_steps(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PULL_STEPS, str(REPO / "prefect.yaml")], env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_failed_push_is_never_deleted_by_the_next_pull_and_is_published_by_it(tmp_path, monkeypatch):
    origin = make_origin(tmp_path)
    remote, unreachable = tmp_path / "remote", unreachable_remote(tmp_path)
    worker = tmp_path / "worker"
    worker.mkdir()
    first = pull_steps(worker_env(tmp_path, origin, str(remote)))
    assert first.returncode == 0, first.stdout + first.stderr
    clone = worker / "lmforge"
    lock = night_run(clone, worker_env(tmp_path, origin, str(remote)), monkeypatch)
    with pytest.raises(PipelineError, match="dvc push"):  # the store is down at the end of the night
        publish(clone, worker_env(tmp_path, origin, unreachable), "night one", print)

    def developer_run(other: Path) -> None:  # another run published its own dvc.lock meanwhile
        (other / "data.txt").write_text("a developer's data\n")
        run(["dvc", "repro"], other, PYTHONPATH=str(REPO))

    moved = push_to_origin(tmp_path, origin, "developer", developer_run)
    head = run(["git", "rev-parse", "HEAD"], clone).stdout.strip()

    refused = pull_steps(worker_env(tmp_path, origin, unreachable))  # next night, the store still down
    said = refused.stdout + refused.stderr
    assert run(["git", "rev-parse", "HEAD"], clone).stdout.strip() == head, said
    assert (clone / "dvc.lock").is_file() and yaml.safe_load((clone / "dvc.lock").read_text()) == lock, said
    assert (clone / "model" / "weights.txt").read_text() == "NIGHT ONE\n"
    assert refused.returncode != 0
    assert "not updated, and nothing deleted" in said and "uncommitted" in said and "dvc.lock" in said, said
    assert f"cd {clone} && dvc push" in said, said
    assert out_hashes(lock) <= stored(worker / "dvc-cache")  # the cache lives beside the clone
    assert (worker / "checkpoints" / "pretrain" / "step-1").is_file()  # and so do the checkpoints

    published = pull_steps(worker_env(tmp_path, origin, str(remote)))  # the store is back
    assert published.returncode == 0, published.stdout + published.stderr
    assert out_hashes(lock) <= stored(remote)  # the failed night's outputs reached the remote
    branches = run(["git", "for-each-ref", "--format=%(refname:short)", "refs/heads/lmforge-pipeline/"],
                   origin).stdout.split()
    assert len(branches) == 1, branches  # its dvc.lock conflicted with the developer's: kept beside it
    assert yaml.safe_load(run(["git", "show", f"{branches[0]}:dvc.lock"], origin).stdout) == lock
    assert run(["git", "rev-parse", "HEAD"], clone).stdout.strip() == moved  # the clone follows origin
    assert out_hashes(lock) <= stored(worker / "dvc-cache") and (worker / "checkpoints" / "pretrain").is_dir()


def test_the_next_pull_puts_a_failed_nights_dvc_lock_on_top_of_a_moved_origin(tmp_path, monkeypatch):
    origin = make_origin(tmp_path)
    remote = tmp_path / "remote"
    clone = tmp_path / "worker" / "lmforge"  # a clone an earlier lmforge made: cache and checkpoints inside
    clone.parent.mkdir()
    run(["git", "clone", "-q", origin.as_uri(), str(clone)], tmp_path)
    lock = night_run(clone, tool_env(PYTHONPATH=str(REPO)), monkeypatch)
    with pytest.raises(PipelineError, match="dvc push"):
        publish(clone, worker_env(tmp_path, origin, unreachable_remote(tmp_path)), "night one", print)
    moved = push_to_origin(tmp_path, origin, "developer", lambda other: (other / "NOTES.md").write_text("notes\n"))

    checkout(clone, worker_env(tmp_path, origin, str(remote)), print)

    assert out_hashes(lock) <= stored(remote) and out_hashes(lock) <= stored(tmp_path / "worker" / "dvc-cache")
    assert not (clone / ".dvc" / "cache").exists() and not (clone / "checkpoints").exists()  # moved beside it
    assert (tmp_path / "worker" / "checkpoints" / "pretrain" / "step-1").is_file()
    log = run(["git", "log", "--format=%H %s", "-2", "main"], origin).stdout.splitlines()
    assert log[0].split(" ", 1)[1].startswith("lmforge-pipeline: dvc.lock of an earlier run") and log[1].startswith(moved)
    assert yaml.safe_load(run(["git", "show", "main:dvc.lock"], origin).stdout) == lock
    assert run(["git", "rev-parse", "HEAD"], clone).stdout.strip() == log[0].split()[0]
    assert (clone / "NOTES.md").is_file()
