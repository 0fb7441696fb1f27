"""The flow under faults: credentials in the tracking URI, overrides DVC writes differently from how
they read, stages that reject their params, SIGTERM/SIGINT to `python -m flows.pipeline run`.

A tiny DVC repository whose one stage, `pretrain`, is a short script told what to do by the
environment (FAKE_STAGE), so each flow run costs seconds; a real Prefect server
(prefect_test_harness) and a real `mlflow server` on loopback, shared by the module."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import flows.pipeline as pipeline_module
from flows.dvc_repo import apply_param_overrides
from flows.errors import PipelineError
from flows.cli import check_prefect_api, main
from flows import failures
from flows.pipeline import _credentials_masked
from flows.summary import SUMMARY_KEY
from lmforge.core.redact import MASK

from conftest import PREFECT_DB, REPO, run, seed_prefect_db, tiny_params, tool_env
from test_flow import QUIET, _run, free_port, mlflow_started, mlflow_uri, prefect_server  # noqa: F401 - shared fixtures

SECRET = "s3cr3t-Pa55"
FAKE_STAGE = """\
import os, sys, time
from pathlib import Path

with open("calls.log", "a") as calls:  # one line per invocation: what the retry tests count
    calls.write("call\\n")
print("tracking at", os.environ.get("MLFLOW_TRACKING_URI"), flush=True)  # a library echoing the URI
mode = os.environ.get("FAKE_STAGE", "ok")
if mode == "sleep":
    Path("running").write_text(str(os.getpid()))
    time.sleep(300)
if mode in ("bad-param", "bad-param-torchrun"):  # what lmforge.core.stage prints; torchrun then exits 1
    print("[pretrain] error: params.yaml is invalid: pretrain.lr must be > 0", file=sys.stderr, flush=True)
    sys.exit(2 if mode == "bad-param" else 1)
if mode == "crash":  # a transient failure: no error line of the stage's own
    print("RuntimeError: NCCL watchdog timeout", file=sys.stderr, flush=True)
    sys.exit(1)
if mode == "killed":  # what the OOM killer or a preempted machine does
    os.kill(os.getpid(), 9)
if mode == "bug":  # a failure of the stage's own making: the same on every attempt
    Path("calls.log", "step_1").mkdir()  # NotADirectoryError, as a checkpoint path through a file
Path("out.txt").write_text("done")
"""


def make_fake_repo(root: Path) -> Path:
    """git + DVC, the repository's params.yaml (tiny), one stage `pretrain` running FAKE_STAGE."""
    (root / "fake_stage.py").write_text(FAKE_STAGE)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"pretrain": {
        "cmd": "python fake_stage.py", "outs": [{"out.txt": {"cache": False}}], "always_changed": True}}}))
    (root / "params.yaml").write_text("# the tiny params\n" + yaml.safe_dump(tiny_params(), sort_keys=False))
    (root / ".gitignore").write_text("calls.log\nrunning\nmlflow.db\nmlruns/\n")
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "fake"], root)
    return root


@pytest.fixture(scope="module")
def fake_repo(tmp_path_factory) -> Path:
    return make_fake_repo(tmp_path_factory.mktemp("fake_repo"))


@pytest.fixture
def flow_env(fake_repo, prefect_server, mlflow_uri, monkeypatch):  # noqa: F811 - the shared fixtures
    """The tiny repo, quiet, logging to the shared MLflow server, retries without their delays. The
    Prefect server is asked for before mlflow_uri: both servers then boot at once (test_flow)."""
    for key, value in QUIET.items():
        monkeypatch.setenv(key, value)
    for key in ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                "MLFLOW_HTTP_REQUEST_TIMEOUT"):  # main() and the flow set them: restored after the test
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setattr(pipeline_module, "RETRY_DELAYS_S", [0, 0])
    (fake_repo / "calls.log").unlink(missing_ok=True)
    return fake_repo


def _calls(repo: Path) -> int:
    path = repo / "calls.log"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _prefect_logs_and_artifacts() -> tuple[list[str], list[str]]:
    """Every log message and summary artifact (markdown and description) the module's server holds."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_logs(limit=200, offset=len(messages))
            messages += [log.message for log in page]
            if len(page) < 200:
                break
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_KEY])))
    return messages, [f"{a.data}\n{a.description}" for a in artifacts]


# ------------------------------------------------------------------------------ credentials


def test_no_credential_in_output_logs_summary_or_tags(flow_env, mlflow_uri, monkeypatch, capsys):  # noqa: F811
    credentialed = mlflow_uri.replace("http://", f"http://lmforge:{SECRET}@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", credentialed)
    monkeypatch.chdir(flow_env)
    override = f"data.files=['s3://AKIA:{SECRET}@bucket/corpus/*.txt']"  # a credential in an override too
    assert main(["run", "-S", override]) == 0
    ok = capsys.readouterr()
    monkeypatch.setenv("FAKE_STAGE", "bad-param")  # fails with the URI in its last lines of output
    assert main(["run"]) == 1
    failed = capsys.readouterr()

    assert f"MLflow run pipeline: {mlflow_uri.replace('http://', f'http://lmforge:{MASK}@')}" in ok.out
    assert failed.err.startswith("error: [pretrain] error:") and f"lmforge:{MASK}@" in failed.err
    messages, summaries = _prefect_logs_and_artifacts()
    assert any(f"tracking at http://lmforge:{MASK}@" in m for m in messages)  # the stage's lines do arrive
    assert any(f"lmforge:{MASK}@" in s for s in summaries)
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id],
                              filter_string="tags.`lmforge.stage` = 'pipeline'")
    tags = [f"{k}={v}" for r in runs for k, v in r.data.tags.items()]
    assert any(k.startswith("lmforge.overrides=") and MASK in k for k in tags)
    for where, texts in {"stdout/stderr": [ok.out, ok.err, failed.out, failed.err], "Prefect logs": messages,
                         "summary artifacts": summaries, "MLflow tags": tags}.items():
        assert not [t for t in texts if SECRET in t], f"the password shows in the {where}"


def test_setup_errors_mask_credentials(flow_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://lmforge:{SECRET}@127.0.0.1:{free_port()}")
    bad = _run(flow_env)
    assert bad["state"].is_failed() and f"lmforge:{MASK}@127.0.0.1" in bad["error"] and SECRET not in bad["error"]
    monkeypatch.setenv("PREFECT_API_URL", f"http://lmforge:{SECRET}@127.0.0.1:{free_port()}/api")
    problem = check_prefect_api(timeout=2)
    assert f"lmforge:{MASK}@127.0.0.1" in problem and SECRET not in problem


def test_a_library_error_leaves_the_flow_with_its_credentials_masked():
    with pytest.raises(PipelineError) as raised, _credentials_masked():
        raise ConnectionError(f"API request to http://lmforge:{SECRET}@mlflow:5000/api/2.0/runs/create failed")
    assert SECRET not in str(raised.value) and f"lmforge:{MASK}@mlflow:5000" in str(raised.value)
    assert raised.value.__suppress_context__  # the original message is not printed under it either


# ---------------------------------------------------------------------- a dead tracking server

RUN_FLOW = """\
import sys
from flows.pipeline import pipeline
state = pipeline(root=sys.argv[1], return_state=True)
print(state.type.value, state.message, flush=True)
"""


class _HealthOnce(BaseHTTPRequestHandler):
    """A tracking server that answers the flow's /health probe, then is gone (handle_request once)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args) -> None:
        pass


def test_a_flow_run_gives_up_on_a_tracking_server_gone_after_its_probe_in_seconds(fake_repo, prefect_server):  # noqa: F811
    # A worker runs the flow through prefect.yaml's entry point, not flows.cli: without the client
    # defaults, MLflow's 7 retries would stall the flow ~4 minutes before it fails.
    from prefect.settings import PREFECT_API_URL

    server = HTTPServer(("127.0.0.1", 0), _HealthOnce)
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    answer_once = threading.Thread(target=lambda: (server.handle_request(), server.server_close()), daemon=True)
    answer_once.start()
    (fake_repo / "calls.log").unlink(missing_ok=True)
    env = tool_env(PYTHONPATH=str(REPO), PREFECT_API_URL=PREFECT_API_URL.value(), MLFLOW_TRACKING_URI=uri, **QUIET)
    started = time.monotonic()
    try:
        flow = subprocess.run([sys.executable, "-c", RUN_FLOW, str(fake_repo)], cwd=fake_repo, env=env,
                              capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the flow still waited on the dead tracking server after 90 s")
    finally:
        server.server_close()
    seconds = time.monotonic() - started
    assert not answer_once.is_alive(), "the flow never probed the tracking server"
    assert flow.stdout.startswith("FAILED"), flow.stdout + flow.stderr[-3000:]
    assert "Connection refused" in flow.stdout + flow.stderr and _calls(fake_repo) == 0  # no stage ran
    print(f"flow failed on the dead tracking server in {seconds:.1f} s")


# -------------------------------------------------------------------------------- overrides


@pytest.fixture
def params_file(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text("# the tiny params\n" + yaml.safe_dump(tiny_params(), sort_keys=False), encoding="utf-8")
    return path


def test_an_override_is_validated_as_dvc_writes_it_and_params_are_restored(params_file):
    before = params_file.read_bytes()
    # YAML 1.1 reads 0x200 as 512, but DVC's editor writes the string '0x200': the stage would fail
    with pytest.raises(PipelineError, match=r"tokenizer\.vocab_size") as raised:
        apply_param_overrides(["tokenizer.vocab_size=0x200"], params_file)
    assert "left as it was" in str(raised.value)
    assert params_file.read_bytes() == before


@pytest.mark.parametrize("override, says", [("data.files=[unclosed", "is malformed"),
                                             ("data.files.x=1", "could not be applied")])  # a key into a list
def test_a_malformed_override_is_one_line_naming_it(params_file, override, says):
    before = params_file.read_bytes()
    with pytest.raises(PipelineError) as raised:  # the first override is written, then undone
        apply_param_overrides(["tokenizer.vocab_size=300", override], params_file)
    assert len(str(raised.value).splitlines()) == 1
    assert str(raised.value).startswith(f"override {override!r} {says}")
    assert params_file.read_bytes() == before


def test_any_failure_while_applying_overrides_restores_params(params_file, monkeypatch):
    import lmforge.core.params

    before = params_file.read_bytes()

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(lmforge.core.params, "load_params", interrupted)
    with pytest.raises(KeyboardInterrupt):
        apply_param_overrides(["tokenizer.vocab_size=300"], params_file)
    assert params_file.read_bytes() == before
    assert [p.name for p in params_file.parent.iterdir()] == ["params.yaml"]  # no temporary file left


def test_valid_overrides_keep_comments_and_may_set_keys_absent_from_the_file(params_file):
    raw = yaml.safe_load(params_file.read_text())
    del raw["tokenizer"]["shard_rows"]
    params_file.write_text("# the tiny params\n" + yaml.safe_dump(raw, sort_keys=False))
    apply_param_overrides(["tokenizer.vocab_size=300", "tokenizer.shard_rows=8"], params_file)
    text = params_file.read_text()
    assert text.startswith("# the tiny params\n")
    written = yaml.safe_load(text)["tokenizer"]
    assert written["vocab_size"] == 300 and written["shard_rows"] == 8


# ---------------------------------------------------------------------------------- retries


@pytest.mark.parametrize("mode", ["bad-param", "bad-param-torchrun"])
def test_a_stage_rejecting_its_params_runs_once(flow_env, monkeypatch, mode):
    monkeypatch.setenv("FAKE_STAGE", mode)
    bad = _run(flow_env)
    assert bad["state"].is_failed() and bad["error"].startswith("[pretrain] error: params.yaml is invalid")
    assert _calls(flow_env) == 1  # pretrain has retries=2: none was used


# DVC reports a SIGKILL as `exited with -9` when it started the command itself, `137` (128 + 9) when a
# shell stood between them: which one depends on the machine's SHELL, and both must be retried.
@pytest.mark.parametrize("mode, says", [("crash", r"RuntimeError: NCCL watchdog timeout"),
                                        ("killed", r"exited with (-9|137)\b")])
def test_a_transient_stage_failure_is_still_retried(flow_env, monkeypatch, mode, says):
    monkeypatch.setenv("FAKE_STAGE", mode)
    bad = _run(flow_env)
    assert bad["state"].is_failed() and re.search(says, bad["error"])
    assert _calls(flow_env) == 1 + pipeline_module.RETRIED_STAGES["pretrain"]


TORCHRUN_RANK_FAILED = """\
[rank0]: Traceback (most recent call last):
[rank0]:   File "stages/pretrain.py", line 90, in main
[rank0]: NotADirectoryError: [Errno 20] Not a directory: 'checkpoints/pretrain' -> 'checkpoints/pretrain.stale'
Traceback (most recent call last):
  File "torch/distributed/run.py", line 892, in main
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
  exitcode  : 1 (pid: 4242)
ERROR: failed to reproduce 'pretrain': failed to run: torchrun -m stages.pretrain, exited with 1"""
EARLIER_WARNING_THEN_KILLED = """\
UserWarning: checkpoint step_00000003 could not be loaded (CheckpointException: Traceback (most recent call last): (RANK 0)
  File "torch/distributed/checkpoint/utils.py", line 193, in reduce_scatter
ValueError: Size mismatch); falling back to the previous checkpoint
ERROR: failed to reproduce 'pretrain': failed to run: python -m stages.pretrain, exited with -9"""


@pytest.mark.parametrize("output, deterministic", [
    (TORCHRUN_RANK_FAILED, True),
    (TORCHRUN_RANK_FAILED.replace("NotADirectoryError", "torch.OutOfMemoryError"), False),
    (EARLIER_WARNING_THEN_KILLED, False),
    ("Traceback (most recent call last):\n  File \"x.py\"\nConnectionResetError: [Errno 104]", False),
    ("Traceback (most recent call last):\n  File \"x.py\"\nKeyError: 'splits'", True),
])
def test_what_a_retry_cannot_fix_is_told_from_the_stage_output(output, deterministic):
    assert failures.is_deterministic("pretrain", output.splitlines()) is deterministic


def test_a_stage_failing_on_a_path_error_of_its_own_runs_once(flow_env, monkeypatch):
    monkeypatch.setenv("FAKE_STAGE", "bug")
    bad = _run(flow_env)
    assert bad["state"].is_failed() and bad["error"].startswith("NotADirectoryError: ")
    assert _calls(flow_env) == 1  # the same traceback on every attempt: no retry


# ---------------------------------------------------------------------------------- signals


def _process_tree(root_pid: int) -> set[int]:
    """`root_pid` and all its descendants, from /proc (ppid links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = set(), [root_pid]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += children.get(pid, [])
    return tree


def _alive(pid: int) -> bool:
    """Running, not a zombie (this container's init may never reap orphans)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    """PREFECT_HOME of the CLI's temporary server: its database migrated once for the module (a copy
    of the session's, when a harness has made one: conftest.seed_prefect_db)."""
    home = tmp_path_factory.mktemp("prefect_home")
    seed_prefect_db(home / PREFECT_DB)
    return home


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_stage_and_prefects_temporary_server(fake_repo, mlflow_uri, prefect_home,  # noqa: F811
                                                                tmp_path, signum):
    (fake_repo / "running").unlink(missing_ok=True)
    env = tool_env(PYTHONPATH=str(REPO), PREFECT_HOME=str(prefect_home), FAKE_STAGE="sleep",
                   MLFLOW_TRACKING_URI=mlflow_uri, **QUIET)
    env.pop("PREFECT_API_URL", None)  # Prefect starts its temporary local server
    cli = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "run"], cwd=fake_repo, env=env,
                           stdout=open(tmp_path / "cli.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    tree: set[int] = {cli.pid}
    try:
        deadline = time.monotonic() + 180
        while not (fake_repo / "running").is_file():
            assert cli.poll() is None and time.monotonic() < deadline, (tmp_path / "cli.log").read_text()
            time.sleep(0.2)
        tree = _process_tree(cli.pid)
        stage = int((fake_repo / "running").read_text())
        assert stage in tree and len(tree) >= 4  # the CLI, the temporary server, dvc, the stage
        os.kill(cli.pid, signum)
        rc = cli.wait(timeout=90)  # stopping the stage and the server takes seconds
        deadline = time.monotonic() + 10
        while [p for p in tree if _alive(p)] and time.monotonic() < deadline:
            time.sleep(0.2)
        log = (tmp_path / "cli.log").read_text()
        assert not [p for p in tree if _alive(p)], f"left running: {[p for p in tree if _alive(p)]}\n{log}"
        assert rc == 128 + signum and f"error: stopped by {signal.Signals(signum).name}" in log, log
    finally:
        for pid in tree | _process_tree(cli.pid):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        cli.wait(timeout=30)
