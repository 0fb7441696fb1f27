"""Where MLflow runs are stored, and whether that store can take one: the tracking URI in use and
its printable label, a brief probe (a server's health; a SQLite file's permissions and integrity),
the experiment `lmforge` in it (its artifacts kept beside an embedded store, whose recorded
locations move with a copied workspace), runs left RUNNING by a process that is gone, and the one
warning a stage prints when logging fails (LOGGING_FAILED_MARKER: the flow looks for it).

Embedded default: `sqlite:///mlflow.db` + `./mlruns` in the repository root (git-ignored);
`MLFLOW_TRACKING_URI` points it at a tracking server instead. The runs themselves (a stage's,
the flow's parent run) are opened and logged through lmforge.track.runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmforge.core.io import pid_alive
from lmforge.core.redact import redact

EXPERIMENT_NAME = "lmforge"
EXPERIMENT_DESCRIPTION = (
    "lmforge: raw text to an evaluated language model. One run per DVC stage (ingest, clean, tokenize, "
    "pretrain, finetune_data, finetune, evaluate, promote), each metric named `<stage>/<metric>` (MLflow's own "
    "`system/...` in the training runs); runs of the Prefect flow nest under a `pipeline` run. Models: "
    "`lmforge-pretrain`, `lmforge-finetune` (aliases `champion`: in use, `challenger`, `candidate`: last evaluated)."
)
logger = logging.getLogger(__name__)

# First words of the stderr line a stage prints when MLflow logging fails (the flow looks for it).
LOGGING_FAILED_MARKER = "[lmforge] mlflow logging failed"

# A stage probes its store once, briefly; a server that dies later costs seconds per call, not
# MLflow's default minutes of retries (setdefault: the environment may ask for more patience).
PROBE_TIMEOUT_S = 3.0
HTTP_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                        # MLflow prints "View run at <URI>" with any credential in it; we log our own, redacted
                        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                        # no progress bars in a stage's log (registering copies the model's files)
                        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
SQLITE_HEADER = b"SQLite format 3\x00"


def use_http_client_defaults() -> None:
    """HTTP_CLIENT_DEFAULTS into this process's environment, where a value is not set already.
    MLflow reads them at each request, so every later call (and every process started from here)
    gives up on a dead server in seconds."""
    for key, value in HTTP_CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def tracking_errors() -> tuple[type[BaseException], ...]:
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


def check_tracking_server(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the tracking store answers (a local store always does); else why not, naming
    MLFLOW_TRACKING_URI. Checked before a pipeline runs anything."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return None
    from lmforge.track.health import check_health

    return check_health(uri, "the MLflow tracking server", "MLFLOW_TRACKING_URI", timeout)


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


def ensure_experiment(root: Path) -> str:
    """The id of the experiment `lmforge` in the store in use (made on first use), pointing the
    MLflow client at that store."""
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


def process_tags() -> dict[str, str]:
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


def find_run(experiment_id: str, tags: Mapping[str, str]) -> str | None:
    """The newest run of the experiment carrying every one of `tags`, or None."""
    from mlflow.tracking import MlflowClient

    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    found = MlflowClient().search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None
