"""Entry-point plumbing for stages: logging set-up and user errors printed without a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from lmforge.errors import LmforgeError


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's main; an LmforgeError becomes one clear line and exit status 2."""
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(levelname)s %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        main()
    except LmforgeError as exc:
        print(f"[{name}] error: {exc}", file=sys.stderr)
        sys.exit(2)
