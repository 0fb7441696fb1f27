"""File digests: sha256 (manifests, markers, checkpoints), DVC's md5 of a file or directory (lineage), read in 1 MiB
chunks, and md5s computed elsewhere (a data stage's workers) remembered while a file's size and mtime hold.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


# md5s of files this process published, computed where they were written (the data stages' workers):
# path -> (size, mtime_ns, md5), trusted while the file's size and mtime are still those.
_KNOWN_MD5: dict[str, tuple[int, int, str]] = {}


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
    stat = path.stat()
    _KNOWN_MD5[str(path.resolve())] = (stat.st_size, stat.st_mtime_ns, md5)


def md5_of(path: Path) -> str:
    """`path`'s md5: remembered while its size and mtime hold, else read."""
    known = _KNOWN_MD5.get(str(path.resolve()))
    if known is not None:
        stat = path.stat()
        if (stat.st_size, stat.st_mtime_ns) == known[:2]:
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
