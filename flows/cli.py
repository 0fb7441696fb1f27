"""The command line of the Prefect flow `lmforge-pipeline` (flows.pipeline, whose `python -m`
entry point runs main here):

    python -m flows.pipeline run [-S key=value ...] [--force] [--stages a,b]
    python -m flows.pipeline serve --cron "0 3 * * *"      # deployment `nightly` (flow.serve)
    python -m flows.pipeline rollback [--reason TEXT]       # registry: `champion` back to the one before
    python -m flows.pipeline promote --version N --reason TEXT   # a person makes version N `champion`

- `run` runs the flow once (on Prefect's temporary local server unless PREFECT_API_URL names one,
  which must answer) and prints each stage's status and the parent MLflow run's link.
- `run` stops cleanly on SIGTERM/SIGINT: the running stage's process group is stopped and
  Prefect's temporary local server is shut down; no process of the run is left behind.
- `rollback` moves the registry's `champion` back (lmforge.track.promotion.rollback), recording who and why.
  The promote stage never promotes the rolled-back weights again (whatever version carries them).
- `promote` is a person's decision (lmforge.track.promotion.promote_by_hand): version N becomes `champion`
  whatever the scores say, with who and why recorded; it is how rolled-back weights come back, and
  how a champion the stage cannot re-score (files never exported) is replaced.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.pipeline import DEFAULT_STAGE_TIMEOUT_S, FLOW_NAME, pipeline
from lmforge import quiet_env
from lmforge.track.health import check_health
from lmforge.core.redact import redact

DEPLOYMENT_NAME = "nightly"


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT reached `python -m flows.pipeline run`. Raised in the main thread, so the
    running stage is stopped (flows.pipeline.repro_stage's `finally`) and the interpreter exits
    normally: Prefect stops its temporary server in an atexit hook, which the default SIGTERM
    action never runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum



def check_prefect_api(timeout: float = 5.0) -> str | None:
    """None when PREFECT_API_URL is unset (temporary local server) or answers; else why not."""
    url = os.environ.get("PREFECT_API_URL")
    return check_health(url, "the Prefect server", "PREFECT_API_URL", timeout) if url else None


def nightly_deployment(cron: str, root: str | None = None) -> Any:
    """The deployment `nightly` of the flow, on a cron schedule (what `serve` serves)."""
    return pipeline.to_deployment(
        name=DEPLOYMENT_NAME, cron=cron, parameters={"root": root} if root else None,
        description="The lmforge pipeline on a schedule: DVC reruns what changed.", tags=["lmforge"],
    )


def _user(getpass: Any) -> str:
    try:
        return getpass.getuser()  # $LOGNAME, $USER, ..., else the password database
    except (KeyError, OSError):  # a container's uid with no name
        return f"uid {os.getuid()}"


def change_champion(command: str, reason: str, version: int | None = None, root: Path | None = None) -> int:
    """`rollback`: the registry's `champion` back to the champion before it (lmforge.track.promotion.rollback);
    `promote`: version `version` made champion by a person (lmforge.track.promotion.promote_by_hand). Both
    record who, when and why; a store that does not answer, or a change that cannot be made, is an
    error line, exit status 2."""
    import getpass
    from datetime import datetime, timezone

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from lmforge.core.errors import LmforgeError
    from lmforge.core.paths import CHAMPION_ALIAS, FINETUNED_MODEL
    from lmforge.track.promotion import promote_by_hand, rollback
    from lmforge.track.store import check_tracking_server, tracking_uri

    problem = check_tracking_server()
    if problem:
        print(f"error: {problem}: {command} changes the MLflow registry, which must answer", file=sys.stderr)
        return 2
    client = MlflowClient(tracking_uri(root or Path.cwd()))
    who, when = _user(getpass), datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        if command == "rollback":
            old, new = rollback(client, FINETUNED_MODEL, who, reason, when)
            moved = f"from version {old} back to version {new}"
        else:
            old = promote_by_hand(client, FINETUNED_MODEL, str(version), who, reason, when)
            moved = f"from version {old} to version {version}" if old else f"to version {version}"
    except (LmforgeError, MlflowException) as exc:
        print(f"error: {redact(str(exc).splitlines()[0])}", file=sys.stderr)
        return 2
    print(f"{FINETUNED_MODEL}: `{CHAMPION_ALIAS}` moved {moved} ({reason})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=FLOW_NAME)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the pipeline once")
    run_p.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="param override, as in `dvc exp run -S` (repeatable)")
    run_p.add_argument("--force", action="store_true", help="rerun the stages even when DVC has them cached")
    run_p.add_argument("--stages", default=None, help="comma-separated stages to run (default: all)")
    run_p.add_argument("--stage-timeout", type=float, default=DEFAULT_STAGE_TIMEOUT_S, help="seconds per stage")
    serve_p = sub.add_parser("serve", help=f"serve the deployment `{DEPLOYMENT_NAME}` on a cron schedule")
    serve_p.add_argument("--cron", default="0 3 * * *", help='cron schedule (default "0 3 * * *")')
    back_p = sub.add_parser("rollback", help="move the registry's `champion` back to the previous champion")
    back_p.add_argument("--reason", default="no reason given", help="why (recorded on both versions)")
    hand_p = sub.add_parser("promote", help="make a registered version `champion` by hand (a person's decision; "
                                            "the way back for rolled-back weights)")
    hand_p.add_argument("--version", required=True, type=int, help="the lmforge-finetune version")
    hand_p.add_argument("--reason", required=True, help="why (recorded on the version)")
    args = parser.parse_args(argv)
    quiet_env()
    from lmforge.track.store import use_http_client_defaults

    # A tracking server gone mid-run costs seconds, not MLflow's minutes of retries (the registry
    # commands' calls; the flow sets the same itself, wherever it is started from).
    use_http_client_defaults()
    if args.command in ("rollback", "promote"):
        return change_champion(args.command, args.reason, getattr(args, "version", None))
    problem = check_prefect_api()
    if problem:
        print(f"error: {problem}: start it (`prefect server start`) or unset PREFECT_API_URL to use a "
              "temporary local server", file=sys.stderr)
        return 2
    if args.command == "serve":
        from prefect import serve

        serve(nightly_deployment(args.cron))
        return 0
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    with _stop_on_signals():
        try:
            state = pipeline(overrides=args.overrides, force=args.force, stages=stages,
                             stage_timeout_s=args.stage_timeout, return_state=True)
        except Stopped as exc:
            print(f"error: stopped by {signal.Signals(exc.signum).name}: the running stage was stopped, later "
                  "stages not run, earlier stages' outputs kept", file=sys.stderr)
            return 128 + exc.signum
    if state.is_completed():
        result = state.result()
        for r in result["stages"]:
            print(f"{r['stage']:<14} {r['status']:<20} {r['seconds']:7.1f} s")
        print(f"MLflow run pipeline: {redact(result['mlflow_url'])}")
        return 0
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the flow's error, printed first and plainly
        print(f"error: {redact(str(exc))}", file=sys.stderr)
    return 1


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise Stopped in the main thread (see Stopped). Only the first: later ones
    are ignored so that they cannot cut the shutdown short (stopping a stage is bounded by
    flows.pipeline.STOP_GRACE_S, Prefect's server by its own 5 s). During a flow run Prefect swaps in its own
    SIGTERM handler; it raises TerminationSignal, and on the way out sends SIGTERM again to the
    handler it replaced, this one. The previous handlers come back at the end."""
    stopping = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            raise Stopped(signum)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)  # None: set outside Python
