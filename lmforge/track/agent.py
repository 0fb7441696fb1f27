"""`python -m lmforge.track.agent DIR`: write the journals deferred stage runs leave in DIR to MLflow
(lmforge.track.deferred), oldest first, through the same StageRun calls a stage makes in its own
process; then wait for more and end after IDLE_S without any. One agent per DIR (a file lock, taken
before anything else), so the MLflow import is paid once for a burst of stages, not once per stage.

A journal written is deleted with its snapshots. One that MLflow refused (the store went down since
the stage probed it) is kept as `<name>.failed` beside the agent's log, `agent.log`, which says why.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.track.deferred import agent_lock, pending

IDLE_S = 10.0


def replay(journal: Path, root: Path) -> bool:
    """Write one journal's run to MLflow: True when every call went through."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.tracking.context.registry import resolve_tags

    from lmforge.track.run_handle import StageRun
    from lmforge.track.store import ensure_experiment, tracking_errors, tracking_uri

    record: dict[str, Any] = json.loads(journal.read_text(encoding="utf-8"))
    snapshots = journal.with_suffix(".files")
    try:
        experiment_id = ensure_experiment(root)
        client = MlflowClient(tracking_uri(root))
        run_id = client.create_run(experiment_id, start_time=record["start_time_ms"], run_name=record["name"],
                                   tags=resolve_tags(record["tags"])).info.run_id  # user, source type, git branch
        handle = StageRun(run_id, record["stage"], experiment_id)
        with mlflow.start_run(run_id=run_id):  # StageRun's fluent calls log into it
            for call in record["calls"]:
                args, kwargs = call["args"], call["kwargs"]
                if call["method"] == "log_artifact":
                    args = [str(snapshots / args[0])]
                if call["method"] == "log_metrics":  # when the stage logged them
                    kwargs = {**kwargs, "timestamp_ms": call["time_ms"]}
                getattr(handle, call["method"])(*args, **kwargs)
        # the stage's own end and status, not the moment this agent got to it
        client.set_terminated(run_id, record["status"], end_time=record["end_time_ms"])
    except tracking_errors() as exc:
        _say(journal, f"{type(exc).__name__}: {exc}")
        return False
    _say(journal, f"MLflow run {run_id} ({record['name']}, {record['status']})")
    return not handle.failed


def _say(journal: Path, message: str) -> None:
    """One line of agent.log about `journal`."""
    print(f"{journal.name}: {message}", file=sys.stderr, flush=True)


def drain(directory: Path, root: Path) -> None:
    """Replay every pending journal in `directory`, oldest first, until none comes for IDLE_S."""
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < IDLE_S:
        journals = pending(directory)
        if not journals:
            if not directory.is_dir():  # the workspace is gone
                return
            time.sleep(0.05)
            continue
        journal = journals[0]
        try:
            written = replay(journal, root)
        except Exception as exc:  # a damaged journal: set it aside, go on with the others
            _say(journal, f"{type(exc).__name__}: {exc}")
            written = False
        if written:
            shutil.rmtree(journal.with_suffix(".files"), ignore_errors=True)
            journal.unlink(missing_ok=True)
        else:
            journal.rename(journal.with_suffix(".failed"))
        idle_since = time.monotonic()


def main(directory: Path) -> None:
    root = Path.cwd()
    while True:
        with agent_lock(directory) as mine:
            if not mine:  # another agent writes this directory
                return
            drain(directory, root)
        # A stage that found the lock taken just before it was released started no agent: look again.
        if not pending(directory):
            return


if __name__ == "__main__":
    from lmforge.track.store import use_http_client_defaults

    use_http_client_defaults()
    main(Path(sys.argv[1]))
