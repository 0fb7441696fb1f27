"""Imports whose log lines a user can act on in no way, kept off the terminal: torchao's (int8
evaluation, lmforge.model.quantize; fp8 training, lmforge.train.fp8), in one place."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lmforge.core.errors import LmforgeError


@contextmanager
def quiet_import() -> Iterator[None]:
    """torchao logs, at import, a warning per GPU kernel library it cannot load (none can on a CPU
    build) and torch one about an Enum it registers: nothing a user can act on, so not on their terminal."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def torchao_module(name: str, needed_for: str) -> Any:
    """The torchao module `name` (e.g. "torchao.float8"), imported quietly; without torchao, one
    LmforgeError saying what `needed_for` needs and how to install it."""
    try:
        with quiet_import():
            return importlib.import_module(name)
    except ImportError as exc:
        raise LmforgeError(f"{needed_for} needs torchao ({exc}): `pip install torchao`") from None
