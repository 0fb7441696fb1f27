"""The one MLflow helper every stage uses: open a run, log params, metrics, artifacts and models,
tag its lineage (lmforge.track.lineage: git commit, the hash of every input), and degrade to one warning
when the store is down, damaged or read-only. The handle a stage logs through is
lmforge.track.run_handle.StageRun; a data stage's run is recorded and written by the workspace's
tracking agent instead (lmforge.track.deferred). The flow's parent run is lmforge.track.pipeline_run.

Where the runs are stored, and whether that store can take one, is lmforge.track.store.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmforge.track.deferred import DeferredRun, journal_dir, now_ms, start_agent, wait_for_journals, write_journal
from lmforge.track.live import LiveRun
from lmforge.track.lineage import git_commit, input_hashes, output_hashes
from lmforge.core.params import flatten
from lmforge.core.timings import breakdown, phase
from lmforge.track.store import (
    ensure_experiment,
    mark_orphans_killed,
    probe_store,
    process_tags,
    report_logging_failure,
    tracking_errors,
    tracking_uri,
    use_http_client_defaults,
)
from lmforge.track.run_handle import StageRun
from lmforge.track.ui import DVC_EXP_NAME, changed_params, model_params, run_link, run_name

logger = logging.getLogger(__name__)

# Set by the Prefect flow (flows/pipeline.py) in the environment of each stage it runs: the stage's
# run nests under the flow's `pipeline` run and carries the flow run's id.
PARENT_RUN_ENV = "LMFORGE_PARENT_RUN_ID"
FLOW_RUN_ENV = "LMFORGE_PREFECT_FLOW_RUN_ID"
# Tag prefix of a stage run's outputs: `lmforge.output.<path>` = DVC's md5 of what the run wrote
# (lineage.content_hash), so a later flow whose stage is a DVC cache hit finds the run that made it.
OUTPUT_TAG = "lmforge.output."


def _run_exists(run_id: str, experiment_id: str) -> bool:
    import mlflow

    try:
        return mlflow.get_run(run_id).info.experiment_id == experiment_id
    except mlflow.exceptions.MlflowException:
        return False


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, BaseModel | Mapping[str, Any]],
    inputs: list[str | Path],
    root: Path | None = None,
    system_metrics: bool = False,
    scored: BaseModel | None = None,
    deferred: bool = False,
    live_key: str | None = None,
) -> Iterator[StageRun | DeferredRun]:
    """Open the MLflow run of one stage (experiment `lmforge`), named by the stage and what differs
    (lmforge.track.ui.run_name: `finetune · method=frozen`, the params changed since the baseline
    commit, the DVC experiment's name).

    `scored`: the whole params of a stage that scores a model (evaluate, promote): the params that
    define that model (lmforge.track.ui.model_params) are logged beside the stage's own.

    `system_metrics`: MLflow samples CPU, memory (and GPU, with nvidia-ml-py) into the run while it
    is open (psutil; the training stages ask for it, on rank 0 only since only rank 0 opens a run).

    The store is probed first; when it cannot take a run, one warning names it and the stage's
    work goes on exactly as with tracking up (every StageRun call then does nothing).

    `deferred`: record the run and leave it to the workspace's tracking agent as the stage ends
    (lmforge.track.deferred: no MLflow import in this process), for a stage that needs no answer
    from MLflow. `live_key`: the same, but the agent writes the run while the stage runs, into the
    run that key names when a killed stage started it (lmforge.track.live: the training stages;
    a resumed stage logs into the run it started, so its curve is one line in the UI).
    Otherwise the runs the agent has still to write are written first, so they come before this one.
    """
    root = (root or Path.cwd()).resolve()
    use_http_client_defaults()
    with phase("hashing"):
        hashes = input_hashes(inputs, root)
    if deferred or live_key is not None:
        with _journaled(stage, params, hashes, root, live_key, system_metrics) as run:
            yield run
        return
    with phase("tracking"):
        left = wait_for_journals(root, tracking_uri(root))
        if left:
            logger.warning("MLflow has not yet written %d earlier stage runs (%s): see %s", len(left),
                           ", ".join(path.name for path in left), left[0].parent / "agent.log")
        handle = _opened(stage, params, hashes, root, system_metrics, scored)
    if handle.run_id is None:
        yield handle
        return
    with _ended(handle, root, _end_run(handle, root)):
        yield handle


def _opened(stage: str, params: Mapping[str, BaseModel | Mapping[str, Any]], hashes: dict[str, str], root: Path,
            system_metrics: bool, scored: BaseModel | None) -> StageRun:
    """The stage's run, started with its params and lineage; one that logs nothing when the store is down."""
    problem = probe_store(root)
    if problem:
        report_logging_failure(problem, root)
        return StageRun(None, stage)
    name, tags, logged = _described(stage, params, hashes, root, scored)
    run = start_run(name, tags, logged, None, system_metrics, root)
    if run is None:
        return StageRun(None, stage)
    handle = StageRun(run.info.run_id, stage, run.info.experiment_id)
    logger.info("MLflow run %s: %s", name, run_link(run.info.experiment_id, run.info.run_id))
    handle.log_params(logged)
    handle.log_dict({"stage": stage, "inputs": hashes}, "lineage.json")
    return handle


def _described(stage: str, params: Mapping[str, BaseModel | Mapping[str, Any]], hashes: dict[str, str], root: Path,
               scored: BaseModel | None) -> tuple[str, dict[str, str], dict[str, str]]:
    """The run's name, tags and params."""
    changed = changed_params(root)
    logged = logged_params(params)
    if scored is not None:
        logged = {**model_params(scored.model_dump(mode="json"), changed), **logged}
    return run_name(stage, logged, changed), run_tags(stage, root, hashes), logged


@contextmanager
def _journaled(stage: str, params: Mapping[str, BaseModel | Mapping[str, Any]], hashes: dict[str, str], root: Path,
               live_key: str | None, system_metrics: bool) -> Iterator[StageRun | DeferredRun]:
    """A run recorded in this process and written to MLflow by the tracking agent, after the probe a
    logged run makes: once the stage ends (a data stage), or live (`live_key`: a training stage).
    Its status as stage_run's: FINISHED, FAILED, KILLED."""
    run: DeferredRun | None = None
    with phase("tracking"):
        problem = probe_store(root)
        if problem:
            report_logging_failure(problem, root)
        else:
            uri = tracking_uri(root)
            name, tags, logged = _described(stage, params, hashes, root, None)
            tags["mlflow.source.name"] = sys.argv[0]  # the stage's entry point, as MLflow names it, not the agent's
            opened = {"stage": stage, "name": name, "tags": tags, "uri": uri, "start_time_ms": now_ms()}
            try:
                if live_key is None:
                    run = DeferredRun(stage, journal_dir(root, uri))
                    run.log_params(logged)
                else:
                    run = LiveRun(stage, journal_dir(root, uri), {**opened, "params": logged, "key": live_key,
                                                                  "system_metrics": system_metrics})
                    start_agent(root, run.directory)
                run.log_dict({"stage": stage, "inputs": hashes}, "lineage.json")
            except OSError as exc:  # no journal: as a store that fails, one warning and the stage's work stands
                report_logging_failure(exc, root)
    if run is None:
        yield StageRun(None, stage)
        return
    if not isinstance(run, LiveRun):  # a live run's line is its link, once the agent has opened it
        logger.info("MLflow run %s: written by the workspace's tracking agent as the stage ends", name)

    def close(status: str) -> None:
        try:
            with phase("tracking"):
                if isinstance(run, LiveRun):
                    run.end(status)
                else:
                    write_journal(run, opened, status)
                    start_agent(root, run.directory)
        except OSError as exc:
            report_logging_failure(exc, root)

    with _ended(run, root, close):
        yield run


def run_tags(stage: str, root: Path, hashes: Mapping[str, str]) -> dict[str, str]:
    """A stage run's tags: the stage, the code's commit, the process, every input's hash, and the
    flow's runs it belongs to (nested under the `pipeline` run when the Prefect flow runs it)."""
    tags = {
        "lmforge.stage": stage,
        "mlflow.source.git.commit": git_commit(root),
        **process_tags(),
        **{f"lmforge.input.{path}": digest for path, digest in hashes.items()},
    }
    if os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    if os.environ.get(FLOW_RUN_ENV):
        tags["lmforge.prefect_flow_run_id"] = os.environ[FLOW_RUN_ENV]
    if os.environ.get(DVC_EXP_NAME):  # `dvc exp run`: filter the table with tags.`lmforge.dvc_experiment`
        tags["lmforge.dvc_experiment"] = os.environ[DVC_EXP_NAME]
    return tags


def logged_params(params: Mapping[str, BaseModel | Mapping[str, Any]]) -> dict[str, str]:
    """The sections flattened to `section.key`: MLflow params are strings of bounded length, so lists
    and dicts become JSON."""
    flat_params = {}
    for section, values in params.items():
        dumped = values.model_dump(mode="json") if isinstance(values, BaseModel) else dict(values)
        flat_params.update(flatten(dumped, f"{section}."))
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in flat_params.items()}


def start_run(name: str, tags: dict[str, str], logged: Mapping[str, str], resume_run_id: str | None,
              system_metrics: bool, root: Path) -> Any:
    """The active MLflow run named `name`: `resume_run_id` continued when it exists with the same
    params, else a new run (linked to it); runs a gone process left RUNNING marked KILLED first.
    None, after one warning, when the store does not answer."""
    import mlflow
    from mlflow.tracking import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        experiment_id = ensure_experiment(root)
        for orphan in mark_orphans_killed(MlflowClient(tracking_uri(root)), experiment_id):
            logger.info("MLflow run %s was left RUNNING by a process that is gone: marked KILLED", orphan)
        start: dict[str, Any] = {"experiment_id": experiment_id, "run_name": name}
        if resume_run_id and _run_exists(resume_run_id, experiment_id):
            if mlflow.get_run(resume_run_id).data.params == logged:
                start = {"run_id": resume_run_id}
            else:  # MLflow params are immutable: a resume with other params is a new, linked run
                tags["lmforge.continues_run"] = resume_run_id
        return mlflow.start_run(**start, tags=tags, log_system_metrics=True if system_metrics else None)
    except tracking_errors() as exc:  # the store does not answer: do the stage's work all the same
        report_logging_failure(exc, root)
        return None


@contextmanager
def _ended(handle: StageRun | DeferredRun, root: Path, close: Callable[[str], None]) -> Iterator[None]:
    """End the run as the stage ends, `close(status)` with FINISHED, FAILED or KILLED; a finished one
    is first tagged with what it made, as dvc.lock will record it (no output depends on this tag)."""
    status = "FINISHED"
    try:
        yield
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    else:
        if not handle.failed:
            with phase("hashing"):
                outputs = output_hashes(root, handle.stage)
            handle.set_tags({f"{OUTPUT_TAG}{path}": md5 for path, md5 in outputs.items()})
    finally:  # where the seconds went, up to here (lmforge.core.timings): `work` beside the fixed costs
        handle.log_metrics({f"timings/{name}_s": seconds for name, seconds in breakdown().items()})
        close(status)


def _end_run(handle: StageRun, root: Path) -> Callable[[str], None]:
    """How a run logged in this process ends: MLflow's end_run (a failure warned once)."""
    def close(status: str) -> None:
        import mlflow

        try:
            mlflow.end_run(status)
        except tracking_errors() as exc:
            if not handle.failed:
                report_logging_failure(exc, root)
    return close
