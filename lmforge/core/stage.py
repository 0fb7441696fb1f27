"""Entry-point plumbing for stages: logging set-up and user errors printed without a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from lmforge.core import timings
from lmforge.core.errors import LmforgeError, disk_full
from lmforge.core.section import write_trace
from lmforge.core.redact import redact


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's main; an LmforgeError becomes one clear line and exit status 2 (a bad param or
    input: never worth a retry), a full disk one line and status 1."""
    timings.stage_started()
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(levelname)s %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "httpx", "filelock", "distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        main()
    except LmforgeError as exc:
        print(redact(f"[{name}] error: {exc}"), file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        where = disk_full(exc)
        if where is None:
            raise
        # Every write is atomic, so nothing partial was left to trust; the MLflow run is marked FAILED.
        print(f"[{name}] error: no space left on device writing {where}: free space there and rerun the stage",
              file=sys.stderr)
        sys.exit(1)
    finally:
        write_trace(name)
        if timings.wanted():
            print(timings.line(name), file=sys.stderr, flush=True)
        timings.stage_ended()  # a caller's process (a test, a flow) goes on without a stage clock
