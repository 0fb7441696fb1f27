"""User-facing errors: raised for bad input or bad params, printed without a traceback.

Every message names the file or params key at fault and says what to do about it.
"""

import contextlib
import errno
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


class LmforgeError(Exception):
    """An error the user can fix (bad params, bad input files, stale outputs)."""


class RunInterrupted(Exception):
    """The stage stopped for a reason outside its params and inputs (a process of a distributed run
    died): printed as one line like LmforgeError, but exit status 1, so a retry is worth it."""


# How libraries word a full disk when they do not pass the OSError on (torch, SQLite).
_DISK_FULL = re.compile(r"no space left on device|database or disk is full|ENOSPC", re.IGNORECASE)
# An absolute path of two parts or more, not the "/O" of "I/O".
_PATH = re.compile(r"(?<![\w/])(/(?:[\w.\-]+/)+[\w.\-]+)")


def disk_full(exc: BaseException) -> str | None:
    """Where a full disk stopped the stage (the path, or 'a file' when no library says), else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return str(seen.filename or "a file")
        if _DISK_FULL.search(str(seen)):
            found = _PATH.search(str(seen))
            return found.group(1) if found else "a file"
        seen = seen.__cause__ or seen.__context__
    return None


# Free bytes under which a failed write is taken for a full disk (torch's zip writer says only
# "unexpected pos", losing the errno).
NEARLY_FULL_BYTES = 1 << 20


@contextlib.contextmanager
def naming_full_disk(path: str | Path, *, check_free: bool = False) -> Iterator[None]:
    """Inside, a full disk while writing `path` raises OSError(ENOSPC) naming `path`: Arrow, torch
    and plain file writes lose the path, torch even the errno (`check_free`: a failure that leaves
    the file system nearly full is a full disk)."""
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        where = disk_full(exc)
        if where == "a file" or (where is None and check_free and _nearly_full(Path(path))):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from exc
        raise


def _nearly_full(path: Path) -> bool:
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return existing is not None and shutil.disk_usage(existing).free < NEARLY_FULL_BYTES
