"""`python -m lmforge.track.agent DIR`: write the journals stages leave in DIR to MLflow, oldest first,
through the same StageRun calls a stage makes in its own process: a data stage's whole journal
(lmforge.track.deferred), a training stage's line by line while it trains (lmforge.track.live); then
wait for more and end after IDLE_S without any. One agent per DIR (a file lock, taken before anything
else), so the MLflow import is paid once for a burst of stages, not once per stage.

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
from lmforge.track.live import LIVE_SUFFIX, RUN_KEY_TAG, read_lines, writer_alive

IDLE_S = 10.0
POLL_S = 0.05


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
                _call(handle, call, snapshots)
        # the stage's own end and status, not the moment this agent got to it
        client.set_terminated(run_id, record["status"], end_time=record["end_time_ms"])
    except tracking_errors() as exc:
        _say(journal, f"{type(exc).__name__}: {exc}")
        return False
    _say(journal, f"MLflow run {run_id} ({record['name']}, {record['status']})")
    return not handle.failed


def follow(journal: Path, root: Path) -> bool:
    """Write a live journal's run as the stage writes it, until its last line, or until its stage is
    gone without one (then the run ends KILLED): True when every call went through."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from lmforge.core.io import write_json
    from lmforge.track.run_handle import StageRun
    from lmforge.track.runs import start_run
    from lmforge.track.store import ensure_experiment, find_run, tracking_errors

    with open(journal, "rb") as opened:
        first = opened.readline()
    header, offset = json.loads(first), len(first)
    snapshots = journal.with_suffix(".files")
    try:
        experiment_id = ensure_experiment(root)
        # the run this key names, when a killed stage started it: a resume logs into the same run
        resumed = find_run(experiment_id, {RUN_KEY_TAG: header["key"]}) or header["key"]
        active = start_run(header["name"], {**header["tags"], RUN_KEY_TAG: header["key"]}, header["params"],
                           resumed, header["system_metrics"], root)
    except tracking_errors() as exc:
        _say(journal, f"{type(exc).__name__}: {exc}")
        return False
    if active is None:  # start_run said why, in agent.log
        return False
    status, end_ms, ended = "KILLED", None, True
    try:
        handle = StageRun(active.info.run_id, header["stage"], active.info.experiment_id)
        write_json(journal.with_suffix(".run"), {"run_id": handle.run_id, "experiment_id": handle.experiment_id,
                                                 "name": header["name"]})
        handle.log_params(header["params"])
        while True:
            calls, offset = read_lines(journal, offset)
            for call in calls:
                if "end" in call:
                    status, end_ms = call["end"], call["end_time_ms"]
                else:
                    _call(handle, call, snapshots)
            if end_ms is not None:
                break
            if not calls:
                if not writer_alive(journal) and not read_lines(journal, offset)[0]:
                    break  # the stage died without its last line: KILLED
                time.sleep(POLL_S)
    finally:  # ends the run, and the system-metrics sampler with it, however this ends
        try:
            mlflow.end_run(status)
            if end_ms is not None:  # the stage's own end, not the moment this agent got to it
                MlflowClient().set_terminated(handle.run_id, status, end_time=end_ms)
        except tracking_errors() as exc:
            _say(journal, f"{type(exc).__name__}: {exc}")
            ended = False
    _say(journal, f"MLflow run {handle.run_id} ({header['name']}, {status})")
    return ended and not handle.failed


def _call(handle: Any, call: dict[str, Any], snapshots: Path) -> None:
    """One recorded StageRun call, made on `handle`: files read from the journal's snapshots."""
    method, args, kwargs = call["method"], call["args"], call["kwargs"]
    if method == "register_model":  # the exported directory's snapshot, loaded and registered here
        from lmforge.track.registration import register_exported

        register_exported(handle, snapshots / args[0], args[1])
        return
    if method == "log_artifact":
        args = [str(snapshots / args[0]), *args[1:]]
    if method == "log_metrics":  # when the stage logged them
        kwargs = {**kwargs, "timestamp_ms": call["time_ms"]}
    getattr(handle, method)(*args, **kwargs)


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
            written = follow(journal, root) if journal.suffix == LIVE_SUFFIX else replay(journal, root)
        except Exception as exc:  # a damaged journal: set it aside, go on with the others
            _say(journal, f"{type(exc).__name__}: {exc}")
            written = False
        if written:
            shutil.rmtree(journal.with_suffix(".files"), ignore_errors=True)
            journal.with_suffix(".run").unlink(missing_ok=True)
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
