"""Tracking that does not block the work: a data stage records what it logs and, as it ends, leaves
it as a journal that one background process per workspace (lmforge.track.agent) writes to MLflow.

Importing MLflow and opening its store costs a stage process ~2 s, more than the data stages' own
work on a small corpus. A deferred run probes the store (sqlite3 or an HTTP health check, no MLflow
import) so a store that is down still gets its one warning from the stage itself, then records calls
in memory; the journal (its calls, params, tags, times and status, and a snapshot of each artifact:
a rerun may replace the file before the agent reads it) is written atomically when the stage ends,
whatever way it ends but a kill -9.

A training stage's run is journaled the same way, but line by line while it trains, so the agent
writes it live (lmforge.track.live).

Order and visibility: the agent replays journals oldest first, one at a time. A stage that logs in
its own process (evaluate, promote: they need answers from MLflow) first waits for the journals
still pending (`wait_for_journals`), and so does the flow before it reads runs, so whatever reads
MLflow after a stage sees that stage's run and the model it registered.

Journals live in `.lmforge/tracking/<store key>/` (git-ignored): the key digests the tracking URI and
the environment MLflow reads (MLFLOW_*, AWS_*), so an agent only ever writes to the store, with the
credentials, of the stages that left its journals.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge.core.io import atomic_path

JOURNALS = Path(".lmforge") / "tracking"
JOURNAL_VERSION = 1
# Environment a stage's MLflow calls depend on: its store and that store's credentials.
STORE_ENV_PREFIXES = ("MLFLOW_", "AWS_")
# How long the flow or a stage that logs in its own process waits for the agent before going on:
# the last journal may hold a training stage's model to register (loaded, traced for pt2, its files
# copied to the store), minutes for a large model. An agent that died is restarted, not waited for.
WAIT_TIMEOUT_S = 600.0
AGENT_START_S = 10.0


def store_key(uri: str, environ: Mapping[str, str] | None = None) -> str:
    """Which agent may write a journal: one per tracking URI and store environment."""
    environ = os.environ if environ is None else environ
    seen = sorted((k, v) for k, v in environ.items() if k.startswith(STORE_ENV_PREFIXES))
    return hashlib.sha256(json.dumps([uri, seen]).encode()).hexdigest()[:16]


def journal_dir(root: Path, uri: str) -> Path:
    return root / JOURNALS / store_key(uri)


def pending(directory: Path) -> list[Path]:
    """The journals not yet written to MLflow, oldest first (names start with the time they were
    left): those of data stages (`.json`) and of training stages, written while they train (`.live`)."""
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir() if path.suffix in (".json", ".live"))


class DeferredRun:
    """StageRun's logging calls, recorded for the agent: the same names and arguments, no answers
    (a stage that needs one, such as a registered model's version, logs in its own process)."""

    def __init__(self, stage: str, directory: Path) -> None:
        self.stage, self.directory = stage, directory
        self.run_id: str | None = None  # the agent creates the run, after the stage has ended
        self.failed = False
        self.calls: list[dict[str, Any]] = []
        self.files: list[tuple[Path, str]] = []  # (workspace file, its name in the journal's snapshot)

    def _record(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append({"method": method, "args": list(args), "kwargs": kwargs, "time_ms": now_ms()})

    def log_params(self, params: Mapping[str, str]) -> None:
        self._record("log_params", dict(params))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._record("log_metrics", _plain(metrics), step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._record("set_tags", {key: str(value) for key, value in tags.items() if value is not None})

    def describe(self, text: str) -> None:
        self._record("describe", text)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        self._record("log_dict", _plain(data), name)

    def log_table(self, rows: list[Mapping[str, Any]], name: str) -> None:
        self._record("log_table", _plain(rows), name)

    def log_datasets(self, datasets: Mapping[str, tuple[str, str]], context: str) -> None:
        self._record("log_datasets", {name: list(pair) for name, pair in datasets.items()}, context)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Recorded with a snapshot of the file as it is now, taken when the journal is written."""
        self._record("log_artifact", self._snapshot(Path(path)), artifact_path=artifact_path)

    def _snapshot(self, path: Path) -> str:
        """The name `path`'s snapshot has in the journal's files."""
        name = f"{len(self.files)}/{path.name}"
        self.files.append((path, name))
        return name


def journal_stem(stage: str) -> str:
    """A journal's name: the time it was left first, so names sort oldest first."""
    return f"{time.time_ns():020d}-{os.getpid()}-{stage}"


def link_snapshot(source: Path, target: Path) -> None:
    """`source` (a file, or a directory's files) at `target`: hard links where the filesystem allows
    (every output is replaced by a rename, never rewritten in place), else copies."""
    if source.is_dir():
        for path in sorted(source.iterdir()):
            if path.is_file():
                link_snapshot(path, target / path.name)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_journal(run: DeferredRun, opened: Mapping[str, Any], status: str) -> Path:
    """The run's journal, its artifacts' snapshots first (link_snapshot), the journal itself last
    and atomically, so the agent never reads half of one."""
    stem = journal_stem(run.stage)
    for source, snapshot in run.files:
        link_snapshot(source, run.directory / f"{stem}.files" / snapshot)
    journal = run.directory / f"{stem}.json"
    record = {"version": JOURNAL_VERSION, **opened, "calls": run.calls, "status": status, "end_time_ms": now_ms()}
    with atomic_path(journal) as tmp:  # NaN allowed: a metric may be one, as MLflow takes it
        tmp.write_text(json.dumps(record), encoding="utf-8")
    return journal


@contextmanager
def agent_lock(directory: Path, blocking: bool = False) -> Iterator[bool]:
    """The agent's lock on `directory`: True when this process holds it (no agent runs there)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "agent.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def agent_running(directory: Path) -> bool:
    with agent_lock(directory) as free:
        return not free


def start_agent(root: Path, directory: Path) -> None:
    """An agent for `directory` unless one runs: its own session (a Ctrl-C of `dvc repro` does not
    stop it mid-journal), its output in `agent.log` there."""
    if agent_running(directory):
        return
    package_root = str(Path(__file__).resolve().parents[2])  # the agent runs the lmforge this stage runs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with open(directory / "agent.log", "a") as log:
        agent = subprocess.Popen([sys.executable, "-m", "lmforge.track.agent", str(directory)], cwd=root, env=env,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + AGENT_START_S  # it takes its lock first thing: one agent, not one per call
    while agent.poll() is None and not agent_running(directory) and time.monotonic() < deadline:
        time.sleep(0.01)


def wait_for_journals(root: Path, uri: str | None = None, timeout: float = WAIT_TIMEOUT_S) -> list[Path]:
    """Wait until the journals pending in `root` are written: those for the store `uri` (an agent
    started for them if none runs: one was killed) and those an agent is writing now to another
    store (it alone holds that store's environment). Returns those still pending at `timeout`."""
    own = journal_dir(root, uri) if uri is not None else None
    deadline = time.monotonic() + timeout
    while True:
        if own is not None and pending(own):
            start_agent(root, own)
        directories = [d for d in sorted((root / JOURNALS).glob("*")) if d.is_dir()]
        left = [path for d in directories if d == own or agent_running(d) for path in pending(d)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def now_ms() -> int:
    """Now, in MLflow's unit: milliseconds since the epoch."""
    return int(time.time() * 1000)


def _plain(data: Any) -> Any:
    """`data` as the journal will hold it (JSON types; anything else as its str)."""
    return json.loads(json.dumps(data, default=str))
