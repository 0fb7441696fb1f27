"""Entry-point plumbing for stages: logging set-up and user errors printed without a traceback."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable

from lmforge.core import timings
from lmforge.core.errors import LmforgeError, RunInterrupted, disk_full
from lmforge.core.section import write_trace
from lmforge.core.redact import redact


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's main; an LmforgeError becomes one clear line and exit status 2 (a bad param or
    input: never worth a retry), a full disk or a RunInterrupted (a lost peer) one line and status 1.
    A stage's own process (its main defined in `__main__`, as `python -m stages.<name>` runs it) then
    ends without Python's teardown."""
    timings.stage_started()
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(levelname)s %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "httpx", "filelock", "distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    status = 0
    try:
        main()
    except LmforgeError as exc:
        print(redact(f"[{name}] error: {exc}"), file=sys.stderr)
        status = 2
    except RunInterrupted as exc:
        print(redact(f"[{name}] stopped: {exc}"), file=sys.stderr)
        status = 1
    except Exception as exc:
        where = disk_full(exc)
        if where is None:
            raise
        # Every write is atomic, so nothing partial was left to trust; the MLflow run is marked FAILED.
        print(f"[{name}] error: no space left on device writing {where}: free space there and rerun the stage",
              file=sys.stderr)
        status = 1
    finally:
        write_trace(name)
        if timings.wanted():
            print(timings.line(name), file=sys.stderr, flush=True)
        timings.stage_ended()  # a caller's process (a test, a flow) goes on without a stage clock
    if getattr(main, "__module__", None) == "__main__" and sys.getprofile() is None:  # cProfile writes after
        exit_process(status)
    if status:
        sys.exit(status)


def exit_process(status: int) -> None:
    """End this process as Python's exit does (non-daemon threads joined, atexit handlers run: MLflow
    ends its run, logging flushes, temporary directories are removed) but without the teardown of
    every module and object after them: for a stage process that imported MLflow, SQLAlchemy and
    pandas that teardown alone took 0.7 s of its ~3 s fixed cost, and nothing in it writes data
    (every output is written and closed, atomically, by then)."""
    try:
        threading._shutdown()  # what Py_FinalizeEx does first (CPython's, as `python` itself calls it)
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
