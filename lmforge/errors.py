"""User-facing errors: raised for bad input or bad params, printed without a traceback.

Every message names the file or params key at fault and says what to do about it.
"""

import errno
import re


class LmforgeError(Exception):
    """An error the user can fix (bad params, bad input files, stale outputs)."""


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
