"""File digests: sha256 (manifests, markers, checkpoints), DVC's md5 of a file or directory (lineage), read in 1 MiB
chunks, and md5s computed elsewhere (a data stage's workers, or a writer as it wrote) remembered while a file's
size and mtime hold.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


# md5s of files this process published, computed where they were written (the data stages' workers, or the
# writer itself): (device, inode) -> (size, mtime_ns, md5), trusted while the file's size and mtime are still
# those. Keyed by the inode, as DVC's own state is: a file written in staging keeps it when it is renamed into
# the output, so its md5 need not be read again there.
_KNOWN_MD5: dict[tuple[int, int], tuple[int, int, str]] = {}
# Whether writers remember the md5s of what they write (lmforge.core.digests.recording_md5s).
_RECORDING = False


def file_digest(path: str | Path, algorithm: str) -> str:
    """The hex digest of a file's bytes (`algorithm` as hashlib names it), read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_md5(path: str | Path) -> str:
    return file_digest(path, "md5")


def remember_md5(path: Path, md5: str) -> None:
    """Record `path`'s md5, computed elsewhere, so content_hash does not read the file again: a data
    stage's driver would otherwise read every byte its workers wrote."""
    stat = Path(path).stat()
    _KNOWN_MD5[(stat.st_dev, stat.st_ino)] = (stat.st_size, stat.st_mtime_ns, md5)


@contextmanager
def recording_md5s() -> Iterator[None]:
    """Inside the block, a writer that hashes what it writes remembers its md5 (written_md5): a data
    stage's driver running its tasks itself, where the output tags will ask for them. A worker
    process never records: it would keep the md5 of every file it wrote, for nobody."""
    global _RECORDING
    before, _RECORDING = _RECORDING, True
    try:
        yield
    finally:
        _RECORDING = before


def written_md5(path: Path, md5: str) -> None:
    """The md5 of the bytes just written to `path`, remembered when this process records them."""
    if _RECORDING:
        remember_md5(path, md5)


def md5_of(path: Path) -> str:
    """`path`'s md5: remembered while its size and mtime hold, else read."""
    stat = Path(path).stat()
    known = _KNOWN_MD5.get((stat.st_dev, stat.st_ino))
    if known is not None and (stat.st_size, stat.st_mtime_ns) == known[:2]:
        return known[2]
    return file_md5(path)


def file_sha256(path: str | Path) -> str:
    return file_digest(path, "sha256")


def content_hash(path: Path) -> str:
    """DVC 3's md5 of a file or directory (the `md5` dvc.lock records for an output): a file's md5,
    or for a directory the md5 of its files' sorted [{"md5", "relpath"}] list as DVC serializes it,
    plus ".dir"; "missing" when there is nothing at `path`."""
    if path.is_file():
        return md5_of(path)
    if path.is_dir():
        listing = [{"md5": content_hash(file), "relpath": file.relative_to(path).as_posix()}
                   for file in path.rglob("*") if file.is_file()]
        listing.sort(key=lambda entry: entry["relpath"])
        return hashlib.md5(json.dumps(listing, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"
    return "missing"
