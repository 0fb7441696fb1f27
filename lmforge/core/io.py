"""File I/O every part of lmforge shares: atomic writes (temp name, then rename), stale temps swept,
strict JSON (no NaN or Infinity, which JSON does not have), spreadsheet-safe CSV.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


from lmforge.core.errors import LmforgeError, naming_full_disk


# Temp names carry the writer's PID (`.<name>.tmp-<pid>` files, `.<name>.tmp-<pid>-<random>` dirs), so a
# temp whose writer is gone (kill -9) is known stale and swept by the next write into that directory.
_TEMP_NAME = re.compile(r"^\..+\.tmp-(?P<pid>\d+)(?:-[A-Za-z0-9_]+)?$")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_name(path: Path) -> Path:
    """The temp path beside `path` that this process writes before renaming it into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def sweep_stale_temps(directory: Path) -> list[Path]:
    """Delete the temps in `directory` left by writers that no longer run; returns them."""
    swept = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            match = _TEMP_NAME.match(entry.name)
            if match and not pid_alive(int(match["pid"])):
                path = Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                swept.append(path)
    return swept


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds.

    A reader therefore sees the old file or the complete new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path.parent)
    tmp = temp_name(path)
    try:
        with naming_full_disk(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def non_finite(data: Any, where: str = "") -> tuple[str, float] | None:
    """(key path, value) of the first NaN or infinity in `data` (`a.b[2]`), else None."""
    if isinstance(data, float) and not math.isfinite(data):
        return where or "the value", data
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for key, value in items:
        found = non_finite(value, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def strict_json(data: Any, path: str | Path, **dumps_kwargs: Any) -> str:
    """`data` as JSON text for the file `path`; a NaN or infinity (which Python would write as the
    non-JSON `NaN`/`Infinity`) is one LmforgeError naming the file and the key instead."""
    try:
        return json.dumps(data, allow_nan=False, **dumps_kwargs)
    except ValueError:
        found = non_finite(data)
        if found is None:
            raise
        raise LmforgeError(f"{path}: {found[0]} is {found[1]}, which JSON cannot hold: not written "
                           "(a diverged model or an empty input upstream)") from None


def write_json(path: str | Path, data: Any) -> None:
    text = strict_json(data, path, indent=2, sort_keys=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(strict_json(row, path, ensure_ascii=False) + "\n")


# A spreadsheet runs a cell that starts with one of these as a formula: a label such as
# `=HYPERLINK(...)` in a report would be code, not text (OWASP "CSV injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """`value` as a CSV cell: a string a spreadsheet would run as a formula gets a leading `'`
    (OWASP's fix; shown as text); numbers stay numbers, so -0.5 is still -0.5."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV file, atomically, every cell made spreadsheet-safe. The one CSV writer of the project."""
    with atomic_path(path) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            for row in itertools.chain([header], rows):
                writer.writerow([spreadsheet_safe(value) for value in row])


def save_figure(fig: Any, path: Path) -> None:
    """A matplotlib figure to `path` as a PNG, laid out tight, written atomically; the figure closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
