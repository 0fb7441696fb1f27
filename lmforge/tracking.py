"""The one MLflow helper every stage uses: open a run, log params, metrics, artifacts and models,
tag its lineage (lmforge.lineage: git commit, the hash of every input), and degrade to one warning
when the store is down, damaged or read-only.

Embedded default: `sqlite:///mlflow.db` + `./mlruns` in the repository root (git-ignored);
`MLFLOW_TRACKING_URI` points it at a tracking server instead.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmforge.data.io import pid_alive
from lmforge.lineage import git_commit, input_hashes
from lmforge.redact import redact

EXPERIMENT_NAME = "lmforge"
EXPERIMENT_DESCRIPTION = (
    "lmforge: raw text to an evaluated language model. One run per DVC stage (ingest, clean, tokenize, "
    "pretrain, finetune_data, finetune, evaluate), each metric named `<stage>/<metric>`; runs of the Prefect "
    "flow nest under a `pipeline` run. Models: `lmforge-pretrain`, `lmforge-finetune` (alias `candidate`)."
)
# The runs table (the UI opens on traces otherwise): `<ui>/#/experiments/<id>/...`
RUNS_TABLE = "#/experiments/{id}/runs?workflowType=machine_learning"
logger = logging.getLogger(__name__)

# Set by the Prefect flow (flows/pipeline.py) in the environment of each stage it runs: the stage's
# run nests under the flow's `pipeline` run and carries the flow run's id.
PARENT_RUN_ENV = "LMFORGE_PARENT_RUN_ID"
FLOW_RUN_ENV = "LMFORGE_PREFECT_FLOW_RUN_ID"
# First words of the stderr line a stage prints when MLflow logging fails (the flow looks for it).
LOGGING_FAILED_MARKER = "[lmforge] mlflow logging failed"


# A stage probes its store once, briefly; a server that dies later costs seconds per call, not
# MLflow's default minutes of retries (setdefault: the environment may ask for more patience).
PROBE_TIMEOUT_S = 3.0
HTTP_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                        # MLflow prints "View run at <URI>" with any credential in it; we log our own, redacted
                        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
SQLITE_HEADER = b"SQLite format 3\x00"


def _tracking_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable, damaged or read-only tracking store raises. Every call caught with
    these is a tracking call (never the stage's own work), so OSError here is the store's."""
    import sqlite3

    import requests
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return (MlflowException, requests.exceptions.RequestException, SQLAlchemyError, sqlite3.Error, OSError)


def store_label(root: Path | None = None) -> str:
    """The store in use, as printed: the URI with any credential masked."""
    named = os.environ.get("MLFLOW_TRACKING_URI")
    return f"MLFLOW_TRACKING_URI={redact(named)}" if named else f"local store {tracking_uri(root)}"


def report_logging_failure(reason: BaseException | str, root: Path | None = None) -> None:
    """One warning naming the store, and the marker line on stderr; the stage carries on."""
    if isinstance(reason, BaseException):
        first = str(reason).splitlines()[0] if str(reason) else ""
        reason = f"{type(reason).__name__}: {first}"
    message = redact(f"{LOGGING_FAILED_MARKER}: {reason} ({store_label(root)}); the stage goes on without logging")
    logger.warning(message)
    print(message, file=sys.stderr, flush=True)


def tracking_uri(root: Path | None = None) -> str:
    """The tracking URI in use: the environment's, else the local store in `root`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or Path.cwd()).resolve()}/mlflow.db"


def _sqlite_problem(db: Path) -> str | None:
    """Why the SQLite store at `db` cannot take a run (missing is fine: MLflow creates it)."""
    import sqlite3

    directory = db.parent
    if not directory.is_dir():
        return f"{directory} does not exist"
    if not db.exists():
        return None if os.access(directory, os.W_OK | os.X_OK) else f"{directory} is not writable"
    if not os.access(db, os.R_OK | os.W_OK) or not os.access(directory, os.W_OK | os.X_OK):
        return f"{db} (or its directory) is not writable"
    with db.open("rb") as handle:
        if handle.read(len(SQLITE_HEADER)) != SQLITE_HEADER and db.stat().st_size > 0:
            return f"{db} is not a SQLite database (damaged): move it aside to start a new store"
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=PROBE_TIMEOUT_S)) as conn:
            verdict = conn.execute("PRAGMA quick_check").fetchone()
    except sqlite3.Error as exc:
        return f"{db} cannot be read ({exc}): move it aside to start a new store"
    if not verdict or verdict[0] != "ok":
        return f"{db} is damaged ({verdict[0] if verdict else 'no answer'}): move it aside to start a new store"
    return None


def probe_store(root: Path | None = None, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the tracking store can take a run; else one line saying why not. Run once per
    stage, before any MLflow call, so a dead or damaged store costs seconds, not minutes."""
    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        return check_tracking_server(timeout)
    if uri.startswith("sqlite:///"):
        return _sqlite_problem(Path(uri[len("sqlite:///"):]))
    return None


def relocate_local_store(db: Path, old: str, new: str) -> int:
    """Point a copied or moved workspace's embedded store at its own `mlruns/`: MLflow records
    absolute artifact locations, so a copy would otherwise write into the original workspace.
    Rewrites the `old` store (a file URI or a path) to `new` (a file URI), as URI and as path, in
    every text column; returns the number of values changed."""
    import sqlite3
    from urllib.parse import unquote, urlparse

    as_path = [unquote(urlparse(uri).path) if uri.startswith("file:") else uri for uri in (old, new)]
    prefixes = [(Path(as_path[0]).as_uri(), new), (as_path[0], as_path[1])]
    changed = 0
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn, conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')
                       if any(kind in (row[2] or "").upper() for kind in ("TEXT", "CHAR", "CLOB"))]
            for column, (before, after) in ((c, p) for c in columns for p in prefixes):
                changed += conn.execute(
                    f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) '
                    f'WHERE substr("{column}", 1, ?) = ?', (after, len(before) + 1, len(before), before),
                ).rowcount
    logger.info("the local MLflow store moved: %d locations now under %s", changed, new)
    return changed


def _ensure_experiment(root: Path) -> str:
    import mlflow

    # MLflow sets its own loggers to INFO on import; its schema-migration chatter is noise here.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    embedded = "MLFLOW_TRACKING_URI" not in os.environ
    mlflow.set_tracking_uri(tracking_uri(root))
    if embedded:  # set_tracking_uri exports the variable; unset must keep meaning "this repo's store"
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    # Embedded store: keep artifacts beside the database, not wherever the cwd happens to be.
    location = (root / "mlruns").resolve().as_uri() if embedded else None
    if experiment is not None:
        recorded = experiment.artifact_location
        if location and "/mlruns" in recorded:  # `<root>/mlruns` or `<root>/mlruns/<id>`, as URI or path
            old_store = recorded[: recorded.rindex("/mlruns") + len("/mlruns")]
            if old_store not in (location, Path(root / "mlruns").resolve().as_posix()):
                relocate_local_store(root / "mlflow.db", old_store, location)
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(EXPERIMENT_NAME, artifact_location=location,
                                        tags={"mlflow.note.content": EXPERIMENT_DESCRIPTION})
    except mlflow.exceptions.MlflowException:  # created concurrently by another stage
        return mlflow.get_experiment_by_name(EXPERIMENT_NAME).experiment_id


def runs_table_link(experiment_id: str) -> str:
    """Where to see the runs: the server's runs table, or how to open the local store's."""
    page = RUNS_TABLE.format(id=experiment_id)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        return redact(f"{uri.rstrip('/')}/{page}")
    return f"`make ui` (mlflow ui --backend-store-uri sqlite:///mlflow.db), then http://127.0.0.1:5000/{page}"


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

    def __init__(self, run_id: str | None, stage: str = "", experiment_id: str | None = None) -> None:
        self.run_id, self.stage, self.experiment_id = run_id, stage, experiment_id
        self.failed = run_id is None

    @_guarded
    def log_params(self, params: Mapping[str, str]) -> None:
        import mlflow

        mlflow.log_params(dict(params))

    @_guarded
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        import mlflow

        # Named `<stage>/<metric>`: a chart compares like with like (the LM's val_loss is not the
        # classifier's), and the runs table groups each stage's figures.
        numeric = {
            f"{self.stage}/{key}" if self.stage else key: float(value)
            for key, value in flatten(metrics).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if numeric:
            mlflow.log_metrics(numeric, step=step)

    @_guarded
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Counts and constants of the run (parameters, world size, ...): not metrics, no steps."""
        import mlflow

        mlflow.set_tags({key: str(value) for key, value in tags.items() if value is not None})

    @_guarded
    def describe(self, text: str) -> None:
        """The run's description in the MLflow UI (markdown): what the stage did, its key figures."""
        import mlflow

        mlflow.set_tag("mlflow.note.content", text)

    @_guarded
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    @_guarded
    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        import mlflow

        mlflow.log_dict(dict(data), name)

    @_guarded
    def log_torch_model(self, model: Any, registered_name: str, signature: Any = None, input_example: Any = None,
                        description: str | None = None) -> Any:
        """Log a plain torch module (pytorch flavor), named like its registered model, and register
        a new version of it (with `description`, when given, on the registered model).

        Pickle serialization with lmforge's source bundled (`code_paths`), so
        `mlflow.pytorch.load_model("models:/<name>/<version>")` works without lmforge installed.
        """
        import mlflow
        import torch

        import lmforge

        if description:
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
            try:
                client.create_registered_model(registered_name, description=description)
            except mlflow.exceptions.MlflowException:  # it exists: keep its description current
                client.update_registered_model(registered_name, description=description)
        return mlflow.pytorch.log_model(
            model,
            name=registered_name,
            signature=signature,
            input_example=input_example,
            serialization_format="pickle",
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "numpy", "safetensors"],
            code_paths=[str(Path(lmforge.__file__).parent)],
            registered_model_name=registered_name,
        )

    @_guarded
    def tag_model_version(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)

    @_guarded
    def describe_model_version(self, name: str, version: str, text: str) -> None:
        from mlflow.tracking import MlflowClient

        MlflowClient().update_model_version(name, version, description=text)

    @_guarded
    def set_model_alias(self, name: str, alias: str, version: str) -> None:
        from mlflow.tracking import MlflowClient

        MlflowClient().set_registered_model_alias(name, alias, version)

    @_guarded
    def find_model_version(self, name: str, tag: str, value: str) -> str | None:
        """The newest registered version of `name` whose tag `tag` is `value` (None: none is)."""
        from mlflow.tracking import MlflowClient

        versions = MlflowClient().search_model_versions(f"name = '{name}'")
        matching = [int(v.version) for v in versions if v.tags.get(tag) == value]
        return str(max(matching)) if matching else None


def _process_tags() -> dict[str, str]:
    """Who runs this run: a RUNNING run whose process is gone was killed (see `mark_orphans_killed`)."""
    return {"lmforge.host": socket.gethostname(), "lmforge.pid": str(os.getpid())}


def mark_orphans_killed(client: Any, experiment_id: str) -> list[str]:
    """Runs left RUNNING by processes of this host that no longer exist (a kill -9, a power cut)
    are marked KILLED; returns their ids. Runs of other hosts are left to those hosts."""
    host = socket.gethostname().replace("'", "")
    orphans = []
    for run in client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`lmforge.host` = '{host}'",
        max_results=1000,
    ):
        pid = run.data.tags.get("lmforge.pid", "")
        if pid.isdigit() and not pid_alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")
            orphans.append(run.info.run_id)
    return orphans


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, BaseModel | Mapping[str, Any]],
    inputs: list[str | Path],
    root: Path | None = None,
    resume_run_id: str | None = None,
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage (experiment `lmforge`, run name = stage).

    `resume_run_id`: continue that run (a training stage resumed after a kill logs into the
    run it started, so its curve is one line in the UI) when it exists in this store.
    The store is probed first; when it cannot take a run, one warning names it and the stage's
    work goes on exactly as with tracking up (every StageRun call then does nothing).
    """
    root = (root or Path.cwd()).resolve()
    for key, value in HTTP_CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    hashes = input_hashes(inputs, root)
    problem = probe_store(root)
    if problem:
        report_logging_failure(problem, root)
        yield StageRun(None, stage)
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)
    tags = {
        "lmforge.stage": stage,
        "mlflow.source.git.commit": git_commit(root),
        **_process_tags(),
        **{f"lmforge.input.{path}": digest for path, digest in hashes.items()},
    }
    if os.environ.get(PARENT_RUN_ENV):  # run by the Prefect flow: nest under its `pipeline` run
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    if os.environ.get(FLOW_RUN_ENV):
        tags["lmforge.prefect_flow_run_id"] = os.environ[FLOW_RUN_ENV]
    flat_params = {}
    for section, values in params.items():
        dumped = values.model_dump(mode="json") if isinstance(values, BaseModel) else dict(values)
        flat_params.update(flatten(dumped, f"{section}."))
    # MLflow params are strings of bounded length; lists and dicts become JSON.
    logged = {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in flat_params.items()}
    errors = _tracking_errors()
    try:
        experiment_id = _ensure_experiment(root)
        for orphan in mark_orphans_killed(MlflowClient(tracking_uri(root)), experiment_id):
            logger.info("MLflow run %s was left RUNNING by a process that is gone: marked KILLED", orphan)
        start: dict[str, Any] = {"experiment_id": experiment_id, "run_name": stage}
        if resume_run_id and _run_exists(resume_run_id, experiment_id):
            if mlflow.get_run(resume_run_id).data.params == logged:
                start = {"run_id": resume_run_id}
            else:  # MLflow params are immutable: a resume with other params is a new, linked run
                tags["lmforge.continues_run"] = resume_run_id
        run = mlflow.start_run(**start, tags=tags)
    except errors as exc:  # the store does not answer: do the stage's work all the same
        report_logging_failure(exc, root)
        run = None
    if run is None:
        yield StageRun(None, stage)
        return
    handle = StageRun(run.info.run_id, stage, run.info.experiment_id)
    logger.info("MLflow run %s/%s: %s", stage, run.info.run_id, runs_table_link(run.info.experiment_id))
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
                report_logging_failure(exc, root)


def check_tracking_server(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the tracking store answers (a local store always does); else why not, naming
    MLFLOW_TRACKING_URI. Checked before a pipeline runs anything."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return None
    from lmforge.health import check_health

    return check_health(uri, "the MLflow tracking server", "MLFLOW_TRACKING_URI", timeout)


class PipelineRun:
    """The parent run `pipeline` (experiment `lmforge`) that the Prefect flow opens and the stages'
    runs nest under. Guarded like StageRun: the first tracking failure warns once and turns its
    logging off (the stages go on); `failure` keeps that warning's line for the flow's last word."""

    def __init__(self, root: Path, run_id: str, experiment_id: str) -> None:
        self.root = root.resolve()
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.failed = False
        self.failure: str | None = None

    @classmethod
    def start(cls, root: Path, tags: Mapping[str, str] | None = None) -> PipelineRun:
        """Open the run (not guarded: a store that cannot open it fails the caller)."""
        from mlflow.tracking import MlflowClient

        root = root.resolve()
        experiment_id = _ensure_experiment(root)
        run = MlflowClient(tracking_uri(root)).create_run(
            experiment_id, run_name="pipeline",
            tags={"lmforge.stage": "pipeline", "mlflow.source.git.commit": git_commit(root), **_process_tags(),
                  **(tags or {})},
        )
        return cls(root, run.info.run_id, experiment_id)

    @_guarded
    def tag(self, tags: Mapping[str, str]) -> None:
        with self._noted("tagging the pipeline run"):
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri(self.root))
            for key, value in tags.items():
                client.set_tag(self.run_id, key, value)

    @_guarded
    def end(self, status: str) -> None:
        with self._noted("closing the pipeline run"):
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri(self.root)).set_terminated(self.run_id, status)

    @contextmanager
    def _noted(self, what: str) -> Iterator[None]:
        """Keep the line of a failure of `what` (the guard around it reports it and turns logging off)."""
        try:
            yield
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else repr(exc)
            self.failure = redact(f"{LOGGING_FAILED_MARKER}: {what}: {first} ({store_label(self.root)})")
            raise
