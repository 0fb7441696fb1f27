"""Lineage: what a run was made from. The git commit of the code (with `-dirty` when tracked files
changed) and the hash of every input, DVC's own md5 from dvc.lock when recorded, else computed alike.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import yaml


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _dvc_lock_hashes(root: Path) -> dict[str, str]:
    """path -> md5 of every output recorded in dvc.lock (upstream stages have finished)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    hashes: dict[str, str] = {}
    for stage in (data.get("stages") or {}).values():
        for entry in stage.get("outs", []) + stage.get("deps", []):
            if "md5" in entry:
                hashes[os.path.normpath(entry["path"])] = entry["md5"]
    return hashes


def content_hash(path: Path) -> str:
    """md5 of a file, or of a directory's sorted (relative path, file md5) list."""
    if path.is_file():
        digest = hashlib.md5()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    if path.is_dir():
        listing = [
            f"{file.relative_to(path).as_posix()} {content_hash(file)}"
            for file in sorted(path.rglob("*"))
            if file.is_file()
        ]
        return hashlib.md5("\n".join(listing).encode()).hexdigest() + ".dir"
    return "missing"


def input_hashes(inputs: list[str | Path], root: Path) -> dict[str, str]:
    """The hash of each input: DVC's from dvc.lock when recorded there, else computed."""
    recorded = _dvc_lock_hashes(root)
    hashes = {}
    for item in inputs:
        key = os.path.normpath(str(item))
        hashes[key] = recorded.get(key) or content_hash(root / key)
    return hashes
