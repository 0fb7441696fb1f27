"""Where ingest's input files are: local paths or fsspec URLs (s3://, gs://...), opened, sized and
identified the same way either way, and the `data.files` globs resolved to the files they match.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterator
from typing import Any, BinaryIO

from lmforge.core.errors import LmforgeError

# More matches than this is a glob gone wrong (e.g. `**` from the root): stop instead of
# listing for hours, and say so.
MAX_GLOB_MATCHES = 1_000_000


def is_url(path: str) -> bool:
    return "://" in path


def input_location(path: str) -> str:
    """Where a worker process reads `path`: URLs as they are, local paths made absolute (workers of
    an external cluster do not share the driver's working directory)."""
    return path if is_url(path) else os.path.abspath(path)


def _filesystem(location: str) -> Any:
    import fsspec

    try:
        return fsspec.core.url_to_fs(location)[0]
    except (ImportError, ValueError) as exc:  # no s3fs/gcsfs installed, an unknown protocol
        raise LmforgeError(
            f"{location}: cannot open this URL ({exc}); install the extra for its storage "
            "(`pip install -e .[s3]` for s3://, `.[gcs]` for gs://) or use a local path"
        ) from None


def open_input(location: str) -> BinaryIO:
    """An input file in binary mode: a local path or an fsspec URL."""
    return _filesystem(location).open(location, "rb") if is_url(location) else open(location, "rb")


def input_size(location: str) -> int:
    return int(_filesystem(location).size(location)) if is_url(location) else os.path.getsize(location)


def input_identity(location: str) -> str:
    """What a completion marker compares to know an input file is unchanged: size and modification
    time (object stores: their ETag or modification time)."""
    if not is_url(location):
        stat = os.stat(location)
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    info = _filesystem(location).info(location)
    return ":".join(str(info.get(key)) for key in ("size", "ETag", "LastModified", "mtime", "updated"))


def resolve_files(patterns: list[str], key: str = "data.files") -> list[str]:
    """The files the globs match (** recursive, relative to cwd, or fsspec URLs), sorted, each real
    file once; `key`: where params.yaml lists the globs, for the errors."""
    found: dict[str, str] = {}  # real path -> the path as the glob spelled it
    for pattern in patterns:
        matches = []
        for path in _glob_urls(pattern) if is_url(pattern) else _glob_files(pattern):
            if len(matches) == MAX_GLOB_MATCHES:
                raise LmforgeError(
                    f"{key}: {pattern!r} matches more than {MAX_GLOB_MATCHES:,} files; "
                    "narrow the glob in params.yaml"
                )
            matches.append(path)
        if not matches:
            raise LmforgeError(
                f"{key}: {pattern!r} matches no files (relative to {os.getcwd()}); "
                f"fix {key} in params.yaml"
            )
        # Sorted: the spelling kept for a file seen twice must not depend on directory order.
        for path in sorted(matches):
            found.setdefault(path if is_url(path) else os.path.realpath(path), path)
    return sorted(found.values())


def _glob_urls(pattern: str) -> Iterator[str]:
    """The files an fsspec URL glob matches, spelled as URLs with the pattern's protocol."""
    filesystem = _filesystem(pattern)
    protocol = pattern.split("://", 1)[0]
    # detail=True: the listing says which entries are files, no request per object.
    for path, info in sorted(filesystem.glob(pattern, detail=True).items()):
        if info.get("type") == "file":
            yield f"{protocol}://{filesystem._strip_protocol(path)}"


def _glob_files(pattern: str) -> Iterator[str]:
    """The files `pattern` matches, lazily, spelled as glob spells them. glob's own `**` follows
    a symlink to a parent directory round and round, so `**` patterns are walked here."""
    parts = pattern.split("/")
    if "**" not in parts:
        yield from (path for path in glob.iglob(pattern) if os.path.isfile(path))
        return
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = "/".join(parts[:fixed]) or ("/" if fixed else "")  # fixed == 1 and "": an absolute "/**/..."
    rest = parts[fixed:]
    enter_hidden = any(part.startswith(".") for part in rest)  # else, as glob, skip .git, .venv...
    for prefix, name in _walk_files(base or ".", enter_hidden):
        if _path_matches([*prefix, name], rest):
            path = os.path.join(base, *prefix, name)
            if os.path.isfile(path):  # not a broken symlink
                yield path


def _walk_files(root: str, enter_hidden: bool) -> Iterator[tuple[list[str], str]]:
    """(directories below `root`, file name) of every file under `root`, in sorted order.
    Symlinked directories are followed, except into a directory that is already on the path
    from `root`: that is a cycle, which would otherwise never end."""
    chains: dict[str, frozenset[tuple[int, int]]] = {}  # directory -> it and its ancestors
    for directory, dirnames, filenames in os.walk(root, followlinks=True):
        stat = os.stat(directory)
        identity = (stat.st_dev, stat.st_ino)
        ancestors = chains.pop(directory, frozenset())
        if identity in ancestors:
            dirnames[:] = []
            continue
        # In place: os.walk descends into these, in this order (a deterministic walk).
        dirnames[:] = sorted(name for name in dirnames if enter_hidden or not name.startswith("."))
        chains.update((os.path.join(directory, name), ancestors | {identity}) for name in dirnames)
        relative = os.path.relpath(directory, root)
        prefix = [] if relative == "." else relative.split(os.sep)
        for name in sorted(filenames):
            yield prefix, name


def _path_matches(parts: list[str], pattern: list[str]) -> bool:
    """Whether path components match glob components; `**` stands for any number of them."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        # As glob: `**` does not enter hidden directories.
        return any(
            _path_matches(parts[skip:], rest)
            for skip in range(len(parts) + 1)
            if not any(part.startswith(".") for part in parts[:skip])
        )
    return bool(parts) and _name_matches(parts[0], head) and _path_matches(parts[1:], rest)


def _name_matches(name: str, pattern: str) -> bool:
    # As glob: a wildcard never matches a leading dot; the pattern must spell it.
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)
