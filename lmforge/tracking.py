"""The one MLflow helper every stage uses: open a run, log params, metrics, artifacts,
and tag its lineage (git commit, stage, the hash of every input it read).

Embedded default: `sqlite:///mlflow.db` + `./mlruns` in the repository root (git-ignored);
`MLFLOW_TRACKING_URI` points it at a tracking server instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

EXPERIMENT_NAME = "lmforge"
logger = logging.getLogger(__name__)

# Set by the Prefect flow (flows/pipeline.py) in the environment of each stage it runs: the stage's
# run nests under the flow's `pipeline` run and carries the flow run's id.
PARENT_RUN_ENV = "LMFORGE_PARENT_RUN_ID"
FLOW_RUN_ENV = "LMFORGE_PREFECT_FLOW_RUN_ID"
# First words of the stderr line a stage prints when MLflow logging fails (the flow looks for it).
LOGGING_FAILED_MARKER = "[lmforge] mlflow logging failed"


def _tracking_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable or failing tracking store raises (never the stage's own errors)."""
    import requests
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.exceptions.RequestException, ConnectionError, TimeoutError)


def report_logging_failure(exc: BaseException) -> None:
    """One warning naming the store, and the marker line on stderr; the stage carries on."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "(unset: local store)"
    message = f"{LOGGING_FAILED_MARKER}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} " \
              f"(MLFLOW_TRACKING_URI={uri}); the stage goes on without logging"
    logger.warning(message)
    print(message, file=sys.stderr, flush=True)


def tracking_uri(root: Path | None = None) -> str:
    """The tracking URI in use: the environment's, else the local store in `root`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or Path.cwd()).resolve()}/mlflow.db"


def _ensure_experiment(root: Path) -> str:
    import mlflow

    # MLflow sets its own loggers to INFO on import; its schema-migration chatter is noise here.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri(root))
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is not None:
        return experiment.experiment_id
    # Embedded store: keep artifacts beside the database, not wherever the cwd happens to be.
    location = None if "MLFLOW_TRACKING_URI" in os.environ else (root / "mlruns").resolve().as_uri()
    try:
        return mlflow.create_experiment(EXPERIMENT_NAME, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created concurrently by another stage
        return mlflow.get_experiment_by_name(EXPERIMENT_NAME).experiment_id


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _dvc_lock_hashes(root: Path) -> dict[str, str]:
    """path -> md5 of every output recorded in dvc.lock (upstream stages have finished)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    hashes: dict[str, str] = {}
    for stage in (data.get("stages") or {}).values():
        for entry in stage.get("outs", []) + stage.get("deps", []):
            if "md5" in entry:
                hashes[os.path.normpath(entry["path"])] = entry["md5"]
    return hashes


def content_hash(path: Path) -> str:
    """md5 of a file, or of a directory's sorted (relative path, file md5) list."""
    if path.is_file():
        digest = hashlib.md5()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    if path.is_dir():
        listing = [
            f"{file.relative_to(path).as_posix()} {content_hash(file)}"
            for file in sorted(path.rglob("*"))
            if file.is_file()
        ]
        return hashlib.md5("\n".join(listing).encode()).hexdigest() + ".dir"
    return "missing"


def input_hashes(inputs: list[str | Path], root: Path) -> dict[str, str]:
    """The hash of each input: DVC's from dvc.lock when recorded there, else computed."""
    recorded = _dvc_lock_hashes(root)
    hashes = {}
    for item in inputs:
        key = os.path.normpath(str(item))
        hashes[key] = recorded.get(key) or content_hash(root / key)
    return hashes


def _run_exists(run_id: str, experiment_id: str) -> bool:
    import mlflow

    try:
        return mlflow.get_run(run_id).info.experiment_id == experiment_id
    except mlflow.exceptions.MlflowException:
        return False


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """A StageRun method that, on a tracking failure, warns once and turns logging off."""

    @functools.wraps(method)
    def call(self: StageRun, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return None
        try:
            return method(self, *args, **kwargs)
        except _tracking_errors() as exc:
            self.failed = True
            report_logging_failure(exc)
            return None

    return call


class StageRun:
    """What a stage logs through; thin on purpose so every stage logs the same way.

    When the tracking store fails (unreachable server), logging stops with one warning and the
    stage goes on: `failed` is then True and every later call does nothing.
    """

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
        self.failed = run_id is None

    @_guarded
    def log_params(self, params: Mapping[str, str]) -> None:
        import mlflow

        mlflow.log_params(dict(params))

    @_guarded
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        import mlflow

        numeric = {
            key: float(value)
            for key, value in flatten(metrics).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if numeric:
            mlflow.log_metrics(numeric, step=step)

    @_guarded
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    @_guarded
    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        import mlflow

        mlflow.log_dict(dict(data), name)

    @_guarded
    def log_torch_model(self, model: Any, registered_name: str, name: str = "model") -> Any:
        """Log a plain torch module (pytorch flavor) and register a new version of it.

        Pickle serialization with lmforge's source bundled (`code_paths`), so
        `mlflow.pytorch.load_model("models:/<name>/<version>")` works without lmforge installed.
        """
        import mlflow
        import torch

        import lmforge

        return mlflow.pytorch.log_model(
            model,
            name=name,
            serialization_format="pickle",
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "numpy", "safetensors"],
            code_paths=[str(Path(lmforge.__file__).parent)],
            registered_model_name=registered_name,
        )


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, BaseModel],
    inputs: list[str | Path],
    root: Path | None = None,
    resume_run_id: str | None = None,
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage (experiment `lmforge`, run name = stage).

    `resume_run_id`: continue that run (a training stage resumed after a kill logs into the
    run it started, so its curve is one line in the UI) when it exists in this store.
    """
    import mlflow

    root = (root or Path.cwd()).resolve()
    logging.getLogger("alembic").setLevel(logging.WARNING)
    hashes = input_hashes(inputs, root)
    tags = {
        "lmforge.stage": stage,
        "mlflow.source.git.commit": git_commit(root),
        **{f"lmforge.input.{path}": digest for path, digest in hashes.items()},
    }
    if os.environ.get(PARENT_RUN_ENV):  # run by the Prefect flow: nest under its `pipeline` run
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    if os.environ.get(FLOW_RUN_ENV):
        tags["lmforge.prefect_flow_run_id"] = os.environ[FLOW_RUN_ENV]
    flat_params = {}
    for section, model in params.items():
        flat_params.update(flatten(model.model_dump(mode="json"), f"{section}."))
    # MLflow params are strings of bounded length; lists and dicts become JSON.
    logged = {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in flat_params.items()}
    errors = _tracking_errors()
    try:
        experiment_id = _ensure_experiment(root)
        start: dict[str, Any] = {"experiment_id": experiment_id, "run_name": stage}
        if resume_run_id and _run_exists(resume_run_id, experiment_id):
            if mlflow.get_run(resume_run_id).data.params == logged:
                start = {"run_id": resume_run_id}
            else:  # MLflow params are immutable: a resume with other params is a new, linked run
                tags["lmforge.continues_run"] = resume_run_id
        run = mlflow.start_run(**start, tags=tags)
    except errors as exc:  # the store does not answer: do the stage's work all the same
        report_logging_failure(exc)
        run = None
    if run is None:
        yield StageRun(None)
        return
    handle = StageRun(run.info.run_id)
    handle.log_params(logged)
    handle.log_dict({"stage": stage, "inputs": hashes}, "lineage.json")
    status = "FINISHED"
    try:
        yield handle
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        try:
            mlflow.end_run(status)
        except errors as exc:
            if not handle.failed:
                report_logging_failure(exc)


def check_tracking_server(timeout: float = 5.0) -> str | None:
    """None when the tracking store answers (a local store always does); else why not, naming
    MLFLOW_TRACKING_URI. Checked before a pipeline runs anything."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.exceptions.RequestException as exc:
        return f"the MLflow tracking server at MLFLOW_TRACKING_URI={uri} does not answer ({type(exc).__name__})"
    if response.status_code != 200:
        return f"the MLflow tracking server at MLFLOW_TRACKING_URI={uri} answered HTTP {response.status_code} on /health"
    return None


def start_pipeline_run(root: Path, tags: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Open the parent run `pipeline` (experiment `lmforge`) that the stages' runs nest under;
    returns (run id, experiment id). Closed with `end_pipeline_run`."""
    from mlflow.tracking import MlflowClient

    root = root.resolve()
    experiment_id = _ensure_experiment(root)
    client = MlflowClient(tracking_uri(root))
    run = client.create_run(
        experiment_id, run_name="pipeline",
        tags={"lmforge.stage": "pipeline", "mlflow.source.git.commit": git_commit(root), **(tags or {})},
    )
    return run.info.run_id, experiment_id


def end_pipeline_run(root: Path, run_id: str, status: str, tags: Mapping[str, str] | None = None) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(root.resolve()))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)
