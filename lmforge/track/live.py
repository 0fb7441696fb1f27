"""A training stage's MLflow run, written while it trains by the workspace's tracking agent: the
stage appends each logging call to a live journal, `<stem>.live` (one JSON line per call, flushed
as made), and never imports MLflow. That takes the ~2.5 s of MLflow's import and store opening off
the stage's path to its first step (the agent pays it once, on the other core, for every stage it
follows), while the UI still shows the curve as it grows.

- The first line says what to open: the run's name, tags and params, and its `key`. The key names
  the run across resumes (kept in the checkpoints' run.json): the agent continues the run tagged
  with it (lmforge.track.runs.start_run: same params, same run), so a stage killed before the agent
  ever answered still resumes into one run.
- The stage holds an exclusive lock on the journal while it lives. A journal without its last line
  (`end`) whose lock is free was left by a process that died: the agent ends its run KILLED.
- Files logged are linked into `<stem>.files/` when logged (every output is replaced by a rename,
  never rewritten, so the link keeps what was logged); the model to register is its exported
  directory, linked the same way, and the agent loads and registers it (lmforge.track.registration).
- Once the run is open the agent writes `<stem>.run` (run and experiment id); the stage links to the
  run in its log when it sees it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from lmforge.track.deferred import JOURNAL_VERSION, DeferredRun, journal_stem, link_snapshot, now_ms

logger = logging.getLogger(__name__)

RUN_KEY_TAG = "lmforge.run_key"
LIVE_SUFFIX = ".live"


def new_key() -> str:
    """A run key for a training run started fresh."""
    return uuid.uuid4().hex


class LiveRun(DeferredRun):
    """DeferredRun's calls, each appended to the live journal as it is made."""

    def __init__(self, stage: str, directory: Path, opened: Mapping[str, Any]) -> None:
        super().__init__(stage, directory)
        self.key, self.name = str(opened["key"]), str(opened["name"])
        self.experiment_id: str | None = None
        self.journal = directory / f"{journal_stem(stage)}{LIVE_SUFFIX}"
        self.snapshots = self.journal.with_suffix(".files")
        self.answer = self.journal.with_suffix(".run")
        directory.mkdir(parents=True, exist_ok=True)
        # Locked before it appears under its name: the agent never takes a journal being opened for dead.
        pending = self.journal.with_suffix(".opening")
        self._handle: IO[str] | None = open(pending, "w", encoding="utf-8")
        fcntl.flock(self._handle, fcntl.LOCK_EX)
        self._write({"version": JOURNAL_VERSION, "pid": os.getpid(), **opened})
        pending.rename(self.journal)

    def _write(self, record: Mapping[str, Any]) -> None:
        assert self._handle is not None
        self._handle.write(json.dumps(record) + "\n")  # one line, one write: the agent reads whole lines
        self._handle.flush()

    def _record(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self._handle is None:
            return
        self._write({"method": method, "args": list(args), "kwargs": kwargs, "time_ms": now_ms()})
        self._announce()

    def _snapshot(self, path: Path) -> str:
        """Linked now, before the line that names it: the agent may read that line at once."""
        name = super()._snapshot(path)
        link_snapshot(path, self.snapshots / name)
        return name

    def register_model(self, directory: Path, spec: Mapping[str, Any]) -> None:
        """Register the model exported in `directory` (lmforge.track.registration.register_exported
        reads `spec`): its files linked now, loaded and registered by the agent."""
        self._record("register_model", self._snapshot(directory), dict(spec))

    def end(self, status: str) -> None:
        """The journal's last line: how the stage ended. The lock goes with the handle."""
        if self._handle is None:
            return
        self._write({"end": status, "end_time_ms": now_ms()})
        self._handle.close()
        self._handle = None
        self._announce()
        if self.run_id is None:  # a short stage: the agent has not opened the run yet
            logger.info("MLflow run %s: written by the workspace's tracking agent (%s)", self.name,
                        self.directory / "agent.log")

    def _announce(self) -> None:
        """Link to the run in the stage's log once the agent has opened it."""
        if self.run_id is not None or not self.answer.is_file():
            return
        try:
            opened = json.loads(self.answer.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # being written, or already swept: ask again at the next call
            return
        from lmforge.track.ui import run_link

        self.run_id, self.experiment_id = opened["run_id"], opened["experiment_id"]
        logger.info("MLflow run %s: %s", opened["name"], run_link(opened["experiment_id"], opened["run_id"]))


def writer_alive(journal: Path) -> bool:
    """Whether the stage that writes `journal` still holds its lock."""
    try:
        with open(journal, encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return False


def read_lines(journal: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The whole lines of `journal` after byte `offset`, and the offset after them."""
    with open(journal, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    complete = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()], offset + len(complete)
