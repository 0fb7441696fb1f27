"""The base of every params.yaml section, and the record of which keys a stage reads.

With LMFORGE_PARAMS_TRACE=<file> set, a stage process records every key it reads from its loaded
params (an attribute read on a section) and appends them to that file when it ends (write_trace),
so tests/test_params_deps.py can hold dvc.yaml's `params:` to what each stage really reads.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict

TRACE_ENV = "LMFORGE_PARAMS_TRACE"
# Each section class -> its dotted place in params.yaml (filled by lmforge.core.params).
SECTION_KEYS: dict[type[BaseModel], str] = {}
# The dotted keys read from loaded params, while tracing (None: not tracing).
_read_keys: set[str] | None = None


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, values are immutable."""

    # inf/nan are never a sensible knob (an lr of nan trains all-NaN weights): refused at load.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if _read_keys is not None and not name.startswith("_") and not isinstance(value, Section):
            prefix = SECTION_KEYS.get(type(self))
            if prefix is not None and name in type(self).model_fields:
                _read_keys.add(f"{prefix}.{name}")
        return value


def start_trace() -> None:
    """Record the keys read from here on, when TRACE_ENV is set (params loading calls it)."""
    global _read_keys
    if os.environ.get(TRACE_ENV) and _read_keys is None:
        _read_keys = set()


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """No recording inside: what the validators read is the loader's, not the stage's."""
    global _read_keys
    saved, _read_keys = _read_keys, None
    try:
        yield
    finally:
        _read_keys = saved


def write_trace(stage: str) -> None:
    """Append the keys this process read to the file TRACE_ENV names (when set): one JSON line
    {"stage", "keys"} in one append (the ranks of a distributed stage share the file)."""
    path = os.environ.get(TRACE_ENV)
    if path and _read_keys is not None:
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps({"stage": stage, "keys": sorted(_read_keys)}) + "\n")
