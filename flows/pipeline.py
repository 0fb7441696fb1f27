"""The Prefect flow `lmforge-pipeline` (the DVC stages as tasks, with param overrides, a parent
MLflow run and a summary artifact) and its stage task; the entry point of prefect.yaml and of
`python -m flows.pipeline run|serve|rollback`, whose command line is flows.cli.

- The tasks are DVC's stages in DVC's topological order (read from dvc.yaml through DVC's own
  index, never restated here). Each runs `dvc repro --single-item <stage>` (`-f` with force) from
  the repository root, its output streamed line by line to the Prefect run logger, so dvc.lock stays
  the truth. Before the first stage, one in-process `dvc status` says which stages are up to date:
  those, as long as no stage upstream of them has run in this flow run, are cache hits reported
  without starting DVC at all (it would print "didn't change, skipping"); once a stage has run, DVC
  decides for each later stage (its "didn't change, skipping" / "is cached" lines mark a hit).
  A cache hit's task run ends in a COMPLETED state named "Cached" (CACHED), so the Prefect UI
  tells it from a stage that ran ("Completed").
- Overrides (`key=value`, like `dvc exp run -S`) are written into params.yaml with DVC's own
  hydra-override editor (what `dvc exp run -S` does, comments kept), then the file as written is
  validated with lmforge.core.params (an unknown key or bad value fails the flow naming it, and the
  original params.yaml bytes are put back). They stay there after the run as `dvc exp run -S`
  leaves them in the workspace, and the finished result is recorded as a DVC experiment with
  `dvc exp save` (it shows in `dvc exp show`).
- MLflow: a parent run `pipeline` (experiment `lmforge`, lmforge.track.pipeline_run.PipelineRun); each stage's
  own run nests under it through LMFORGE_PARENT_RUN_ID (lmforge.track.runs.stage_run reads it) and is
  tagged with the Prefect flow run id. The parent carries `stage.<name>` = `ran` |
  `skipped (cache hit)` | `failed`, `stage.<name>.run_id` = the run that produced the stage's outputs
  (this flow's, or for a cache hit an earlier one: found by the md5s dvc.lock records), the DVC
  metrics as `<stage>/<metric>`, the key params and a description linking each stage's run
  (flows.summary.record_parent_run).
- A stage that fails fails the flow with the stage's own error line first; later stages do not run
  and earlier outputs stay. pretrain and finetune retry with backoff (they resume from checkpoints)
  a failure a retry may fix (killed, out of memory, NCCL, a connection), never one that fails the
  same way every time: the stage rejecting its params or input (its `[stage] error:` line, exit
  status 2) or a traceback ending in a path error or a bug (SAME_EVERY_TIME).
- `push` (the deployment `nightly` in prefect.yaml sets it): after the stages, the task `publish`
  (flows.remote) runs `dvc push` and commits and pushes dvc.lock to git's origin, so another
  clone's `dvc pull` finds every stage a cache hit but promote (always_changed in dvc.yaml: it reads
  the registry). It takes no overrides (they are experiments).
- No credential is printed, logged or stored: every URI and message the flow emits goes through
  lmforge.core.redact (user-info passwords and token-like query parameters become ***).
- A stage task stopped by a signal or its timeout stops the stage's whole process group (DVC and
  the stage under it); no process of the run is left behind.

What the flow reads and writes through DVC is in flows.dvc_repo, what it shares with the team in
flows.remote, its summary artifact in flows.summary, its errors in flows.errors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import State, flow, get_run_logger, task
from prefect.states import Completed

from flows.dvc_repo import apply_param_overrides, dvc_changed, dvc_lock_entry, dvc_stages, exp_save
from flows.errors import PipelineError, StageInputError
from flows.failures import error_line, is_deterministic
from flows.remote import publish, worker_locations
from flows.summary import mlflow_run_links, publish_summary, record_parent_run
from lmforge import quiet_env
from lmforge.core.redact import redact

FLOW_NAME = "lmforge-pipeline"
RETRIED_STAGES = {"pretrain": 2, "finetune": 2}  # they resume from their checkpoints
RETRY_DELAYS_S = [30, 120]
DEFAULT_STAGE_TIMEOUT_S = 12 * 3600
CACHE_HIT_LINES = ("didn't change, skipping", "is cached")
LOCK_LINE = "Unable to acquire lock"
SKIPPED = "skipped (cache hit)"
CACHED = "Cached"  # the Prefect state name of a stage task that was a cache hit (type COMPLETED)
STOP_GRACE_S = 10  # a stopped stage's seconds to exit on SIGTERM before SIGKILL


# ----------------------------------------------------------------------------------- stage task


def retry_unless_deterministic(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn` for the stage tasks: retry anything but a StageInputError
    (a bad param or a wrong path fails identically on every attempt; retrying only costs the delays)."""
    return not isinstance(state.result(raise_on_failure=False), StageInputError)


def _stage_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of the DVC processes the flow starts: this one's with telemetry off, this
    interpreter's tools first on PATH, output unbuffered (streamed line by line), then `extra`."""
    env = quiet_env(dict(os.environ))
    for key, value in worker_locations(env).items():  # on a worker: its checkpoints outside its clone
        env.setdefault(key, value)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"  # (each stage sets its MLflow client defaults itself: tracking.stage_run)
    env.update(extra)
    return env


def _cache_hit(stage: str, seconds: float, why: str) -> State:
    """The final state of a stage task that did not run: COMPLETED, named CACHED (Prefect's UI
    shows that name), with the stage's result as its data."""
    return Completed(name=CACHED, message=f"DVC cache hit: {why}",
                     data={"stage": stage, "status": SKIPPED, "seconds": seconds, "logging_failed": None})


@task(name="stage")
def repro_stage(stage: str, root: str, force: bool, env: dict[str, str], known_hit: bool,
                timeout_s: float) -> dict[str, Any] | State:
    """One DVC stage: `dvc repro --single-item <stage>`, streamed to the run logger. Returns the
    stage's result, or for a cache hit a state named CACHED that carries it (see stage_result)."""
    from lmforge.track.store import LOGGING_FAILED_MARKER

    logger = get_run_logger()
    started = time.perf_counter()
    if known_hit:
        logger.info("stage %s: dvc status says it is up to date: %s", stage, SKIPPED)
        return _cache_hit(stage, time.perf_counter() - started, "`dvc status` says it is up to date; not run")
    before = dvc_lock_entry(Path(root), stage)
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage] + (["-f"] if force else [])
    logger.info("stage %s: %s", stage, " ".join(cmd[1:]))
    # Its own session: a signal or timeout stops DVC and the stage under it as one process group.
    process = subprocess.Popen(cmd, cwd=root, env=_stage_env(env), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        _stop_group(process)

    watchdog = threading.Timer(timeout_s, on_timeout)
    watchdog.start()
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for raw in process.stdout:
            line = redact(raw.rstrip("\n"))  # a library may echo the tracking URI with its password
            lines.append(line)
            if line.strip():
                logger.info("[%s] %s", stage, line)
        rc = process.wait()
    finally:  # also on SIGTERM/SIGINT (flows.cli.Stopped, Prefect's TerminationSignal) and Prefect's timeout
        watchdog.cancel()
        if process.poll() is None or _group_alive(process.pid):
            _stop_group(process)
    seconds = time.perf_counter() - started
    if timed_out.is_set():
        raise PipelineError(f"stage '{stage}' timed out after {timeout_s:.0f} s and was stopped "
                            f"(its checkpoints, if any, are kept)")
    if rc != 0:
        if any(LOCK_LINE in line for line in lines):
            lock = next(line for line in lines if LOCK_LINE in line)
            raise PipelineError(
                f"{lock}\nstage '{stage}' not run: another DVC process (another pipeline run or `dvc repro`) "
                f"holds the lock of {root}; wait for it to finish"
            )
        tail = "\n".join(lines[-25:])
        error = StageInputError if is_deterministic(stage, lines) else PipelineError
        raise error(
            f"{error_line(stage, lines)}\nstage '{stage}' failed (dvc repro exited {rc}); later stages not run, "
            f"earlier stages' outputs kept.\n--- last lines of its output ---\n{tail}"
        )
    hit = any(marker in line for line in lines for marker in CACHE_HIT_LINES) and not force
    hit = hit or (not force and before is not None and before == dvc_lock_entry(Path(root), stage))
    failed = next((line for line in lines if line.startswith(LOGGING_FAILED_MARKER)), None)
    if failed:
        logger.warning("stage %s finished, but its MLflow logging failed: %s", stage, failed)
    status = SKIPPED if hit else "ran"
    logger.info("stage %s: %s in %.1f s", stage, status, seconds)
    if hit and not failed:
        return _cache_hit(stage, seconds, "`dvc repro` found it unchanged and skipped it")
    return {"stage": stage, "status": status, "seconds": seconds, "logging_failed": failed}


def stage_result(returned: dict[str, Any] | State) -> dict[str, Any]:
    """What a stage task call returned, as its result: a task that returns a state ends in that
    state, and the call then returns the state itself (Prefect 3), not its data."""
    return returned.result() if isinstance(returned, State) else returned


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: an init that does not reap
    orphans (as in some containers) would keep them in the group for ever."""
    if not Path("/proc/self/stat").is_file():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _stop_group(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """Stop a stage's process group (DVC and the stage under it): SIGTERM, up to `grace_s` for the
    stage to exit (its checkpoints are written atomically either way), then SIGKILL."""
    try:
        _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while (process.poll() is None or _group_alive(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()


# ---------------------------------------------------------------------------------------- flow


@flow(name=FLOW_NAME)
def pipeline(overrides: list[str] | None = None, force: bool = False, stages: list[str] | None = None,
             root: str | None = None, stage_timeout_s: float = DEFAULT_STAGE_TIMEOUT_S,
             push: bool = False) -> dict[str, Any]:
    """Run the DVC stages (all, or `stages`) as tasks; with `push`, then publish what they produced
    (flows.remote.publish); see the module docstring."""
    from lmforge.track.store import use_http_client_defaults

    # Here, not in a command line: a worker starts the flow from prefect.yaml's entry point, and a
    # tracking server gone mid-run must cost seconds, not MLflow's ~4 minutes of retries per call.
    use_http_client_defaults()
    if push and overrides:  # the team's branch gets the params.yaml it has, not a run's experiment
        raise PipelineError("push publishes dvc.lock to the team's branch, so it takes no overrides: commit the "
                            "params change instead, or run the experiment without push and share it with "
                            "`dvc exp push origin <name>`")
    with _credentials_masked():
        return _run_pipeline(list(overrides or []), force, stages, Path(root or os.getcwd()).resolve(),
                             stage_timeout_s, push)


@contextmanager
def _credentials_masked() -> Iterator[None]:
    """A library's exception leaves the flow with its credentials masked: MLflow's own messages
    carry the tracking URI (`API request to http://user:secret@host/...`), and Prefect logs and
    stores whatever the flow raises."""
    try:
        yield
    except PipelineError:
        raise  # redacted when made
    except Exception as exc:
        if redact(str(exc)) == str(exc):
            raise
        raise PipelineError(f"{type(exc).__name__}: {exc}") from None


def _run_pipeline(overrides: list[str], force: bool, stages: list[str] | None, repo: Path,
                  stage_timeout_s: float, push: bool = False) -> dict[str, Any]:
    from prefect.runtime import flow_run

    from flows.dvc_repo import check_params_file
    from lmforge.track.pipeline_run import PipelineRun
    from lmforge.track.runs import FLOW_RUN_ENV, PARENT_RUN_ENV
    from lmforge.track.store import check_tracking_server

    logger = get_run_logger()
    # The flow logs its own, redacted, run URL; MLflow's "View run at" line would print the password.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    problem = check_tracking_server()
    if problem:
        raise PipelineError(f"{problem}: start it, or unset MLFLOW_TRACKING_URI to log to the local store")
    check_params_file(repo / "params.yaml")
    order, _, metrics_files = dvc_stages(repo)
    unknown = [name for name in (stages or []) if name not in order]
    if unknown:
        raise PipelineError(f"unknown stage(s) {', '.join(unknown)}: dvc.yaml has {', '.join(order)}")
    selected = [name for name in order if stages is None or name in stages]
    if overrides:
        apply_param_overrides(overrides, repo / "params.yaml")
        logger.info("params.yaml overrides applied: %s", redact(", ".join(overrides)))

    flow_run_id = str(flow_run.id or "")
    # Opening the run is not guarded: a store that cannot open it fails the flow here, before any stage.
    run = PipelineRun.start(repo, tags={
        "lmforge.prefect_flow_run_id": flow_run_id, "lmforge.overrides": redact(json.dumps(overrides)),
        "lmforge.force": str(force),
    })
    links = mlflow_run_links(run.run_id, run.experiment_id, repo)
    url = str(links)
    logger.info("MLflow run `pipeline` %s: %s", run.run_id, url)
    env = {PARENT_RUN_ENV: run.run_id, FLOW_RUN_ENV: flow_run_id}
    results: list[dict[str, Any]] = []
    experiment = None
    try:
        changed = set(order) if force else dvc_changed(repo)
        upstream_ran = False
        for name in selected:
            stage_task = repro_stage.with_options(
                name=name, task_run_name=name, retries=RETRIED_STAGES.get(name, 0),
                retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=retry_unless_deterministic,
                timeout_seconds=stage_timeout_s + 120,
            )
            known_hit = not force and not upstream_ran and name not in changed
            try:
                result = stage_result(stage_task(name, str(repo), force, env, known_hit, stage_timeout_s))
            except BaseException:
                run.tag({f"stage.{name}": "failed"})
                raise
            results.append(result)
            upstream_ran = upstream_ran or result["status"] == "ran"
            run.tag({f"stage.{name}": result["status"], f"stage.{name}.seconds": f"{result['seconds']:.2f}"})
        if overrides:
            experiment = exp_save(repo, overrides, f"flow-{flow_run.name or flow_run_id[:8]}", _stage_env({}), logger)
        if push:
            publish_task(str(repo), f"flow run {flow_run.name or flow_run_id}")
    except BaseException as exc:
        outcome = f"failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        record_parent_run(run, repo, order, results, metrics_files, overrides, outcome)
        publish_summary(results, repo, metrics_files, links, overrides, outcome, experiment)
        run.end("FAILED")
        raise
    failures = [r for r in results if r["logging_failed"]]
    record_parent_run(run, repo, order, results, metrics_files, overrides,
                      "succeeded" if not failures else "stages done, MLflow logging failed")
    if run.failed:  # the flow's own MLflow calls: the first failure turned them off (PipelineRun)
        failures.append({"stage": "pipeline (parent run)", "logging_failed": run.failure})
    outcome = "succeeded" if not failures else "stages done, MLflow logging failed"
    metrics = publish_summary(results, repo, metrics_files, links, overrides, outcome, experiment)
    run.end("FINISHED" if not failures else "FAILED")
    if failures:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "(local store)")
        raise PipelineError(
            f"MLflow logging failed in stage(s) {', '.join(r['stage'] for r in failures)} "
            f"(MLFLOW_TRACKING_URI={uri}); their outputs are on disk and in dvc.lock:\n"
            + "\n".join(r["logging_failed"] for r in failures)
        )
    return {"mlflow_run_id": run.run_id, "mlflow_url": url, "stages": results, "metrics": metrics,
            "experiment": experiment}


@task(name="publish")
def publish_task(root: str, note: str) -> str | None:
    """`dvc push` what the stages produced, then commit and push dvc.lock (flows.remote.publish)."""
    logger = get_run_logger()
    return publish(Path(root), _stage_env({}), note, lambda line: logger.info("[publish] %s", line))


if __name__ == "__main__":  # `python -m flows.pipeline ...`: the command line is flows.cli
    # This file runs as `__main__`; registered under its own name too, flows.cli's import of
    # flows.pipeline finds it instead of running it a second time (one flow object, one module).
    sys.modules.setdefault("flows.pipeline", sys.modules[__name__])
    from flows.cli import main

    sys.exit(main())
