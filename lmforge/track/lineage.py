"""Lineage: what a run was made from and what it made. The git commit of the code (with `-dirty`
when tracked files changed), the hash of every input (the md5 dvc.lock records for it as its
producing stage's output, when that still describes the file, else computed alike) and of every
output a stage declares in dvc.yaml, in DVC's format, so the run that produced a DVC-cached output is
found by the md5 dvc.lock records for it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lmforge.core import paths
from lmforge.core.digests import content_hash


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


def _load_yaml(path: Path) -> Any:
    """yaml.safe_load's data, parsed by libyaml where PyYAML has it: dvc.lock lists every file of
    every output, and the pure-Python parser takes a tenth of a second per read of a small one."""
    return yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def recorded_outputs(root: Path) -> dict[str, dict[str, Any]]:
    """path -> dvc.lock's entry for it (md5, size, and nfiles for a directory) among the `outs` of the
    stage that produces it. Only that entry describes the path once its stage has rerun: DVC writes
    each stage's entry as the stage finishes, so a downstream stage's `deps` entry still holds the md5
    that stage last ran with until it runs again. (DVC gives each path one producing stage.)"""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    data = _load_yaml(lock) or {}
    return {os.path.normpath(entry["path"]): entry
            for stage in (data.get("stages") or {}).values()
            for entry in stage.get("outs", []) if "md5" in entry}


def recorded_hashes(root: Path) -> dict[str, str]:
    """path -> md5 of every output recorded in dvc.lock (its producing stage's record)."""
    return {path: entry["md5"] for path, entry in recorded_outputs(root).items()}


def stage_outputs(root: Path, stage: str) -> list[str]:
    """The outputs dvc.yaml declares for `stage` (outs, metrics, plots) that DVC caches, i.e. not
    `cache: false` (checkpoints): what identifies the stage's result. Empty without dvc.yaml."""
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return []
    entry = ((_load_yaml(dvc_yaml) or {}).get("stages") or {}).get(stage) or {}
    outputs = []
    for kind in ("outs", "metrics", "plots"):
        for item in entry.get(kind) or []:
            path, options = (next(iter(item.items())) if isinstance(item, dict) else (item, None))
            if (options or {}).get("cache", True):
                outputs.append(os.path.normpath(str(path)))
    return outputs


def output_hashes(root: Path, stage: str) -> dict[str, str]:
    """content_hash of each of the stage's cached outputs as written (dvc.lock's md5 of each, once
    DVC has recorded the stage)."""
    return {path: content_hash(root / path) for path in stage_outputs(root, stage)}


def _as_recorded(path: Path, entry: Mapping[str, Any]) -> bool:
    """Whether `path` has the size (and, for a directory, the number of files) its dvc.lock entry
    records beside the md5: stat calls only, no byte read. It catches an output replaced outside DVC
    with one of another size; within `dvc repro` (and `dvc exp run`, the flow's stage runs) the entry
    is the file, since DVC records each stage's outputs as it finishes and reruns or restores any
    upstream stage whose outputs differ from their entries before it runs a stage below. (An entry
    without `hash: md5` is DVC 2's md5, of text with Windows line ends made Unix ones: not the bytes'.)"""
    if entry.get("hash") != "md5" or "size" not in entry:
        return False
    if path.is_file():
        return "nfiles" not in entry and path.stat().st_size == entry["size"]
    if path.is_dir():
        files = [file.stat().st_size for file in path.rglob("*") if file.is_file()]
        return entry.get("nfiles") == len(files) and entry["size"] == sum(files)
    return False


def input_hashes(inputs: list[str | Path], root: Path) -> dict[str, str]:
    """The hash of each input as the stage reads it: its producing stage's md5 in dvc.lock while the
    path still has the size recorded with it (huge data is not read again), else computed."""
    recorded = recorded_outputs(root)
    hashes = {}
    for item in inputs:
        key = os.path.normpath(str(item))
        entry = recorded.get(key)
        hashes[key] = entry["md5"] if entry and _as_recorded(root / key, entry) else content_hash(root / key)
    return hashes


# The data a model is made from, upstream to downstream: name (of its lineage tag) -> path.
DATA_LINEAGE = {"raw": paths.RAW, "clean": paths.CLEAN, "tokenizer": paths.TOKENIZER,
                "shards": paths.SHARDS}


def dvc_remote_url(root: Path) -> str | None:
    """The URL of the repository's default DVC remote (`dvc remote add -d`), None without one."""
    from dvc.config import Config

    config = Config(dvc_dir=str(root / ".dvc"))
    name = config["core"].get("remote")
    remote = config.get("remote", {}).get(name) if name else None
    return remote["url"].rstrip("/") if remote and remote.get("url") else None


def dataset_source(path: str | Path, digest: str, remote: str | None, root: Path) -> str:
    """Where a DVC-tracked dataset with DVC hash `digest` can be fetched: its object in the remote
    (DVC 3's layout `<remote>/files/md5/<2 hex>/<rest>`), else the path in this workspace."""
    if remote and digest != "missing":
        return f"{remote}/files/md5/{digest[:2]}/{digest[2:]}"
    return (root / path).resolve().as_uri()
