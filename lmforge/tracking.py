"""The one MLflow helper every stage uses: open a run, log params, metrics, artifacts,
and tag its lineage (git commit, stage, the hash of every input it read).

Embedded default: `sqlite:///mlflow.db` + `./mlruns` in the repository root (git-ignored);
`MLFLOW_TRACKING_URI` points it at a tracking server instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

EXPERIMENT_NAME = "lmforge"
logger = logging.getLogger(__name__)


def tracking_uri(root: Path | None = None) -> str:
    """The tracking URI in use: the environment's, else the local store in `root`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root or Path.cwd()).resolve()}/mlflow.db"


def _ensure_experiment(root: Path) -> str:
    import mlflow

    # MLflow sets its own loggers to INFO on import; its schema-migration chatter is noise here.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri(root))
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is not None:
        return experiment.experiment_id
    # Embedded store: keep artifacts beside the database, not wherever the cwd happens to be.
    location = None if "MLFLOW_TRACKING_URI" in os.environ else (root / "mlruns").resolve().as_uri()
    try:
        return mlflow.create_experiment(EXPERIMENT_NAME, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created concurrently by another stage
        return mlflow.get_experiment_by_name(EXPERIMENT_NAME).experiment_id


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


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


def _run_exists(run_id: str, experiment_id: str) -> bool:
    import mlflow

    try:
        return mlflow.get_run(run_id).info.experiment_id == experiment_id
    except mlflow.exceptions.MlflowException:
        return False


class StageRun:
    """What a stage logs through; thin on purpose so every stage logs the same way."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        import mlflow

        numeric = {
            key: float(value)
            for key, value in flatten(metrics).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if numeric:
            mlflow.log_metrics(numeric, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        import mlflow

        mlflow.log_dict(dict(data), name)

    def log_torch_model(self, model: Any, registered_name: str, name: str = "model") -> Any:
        """Log a plain torch module (pytorch flavor) and register a new version of it.

        Pickle serialization with lmforge's source bundled (`code_paths`), so
        `mlflow.pytorch.load_model("models:/<name>/<version>")` works without lmforge installed.
        """
        import mlflow
        import torch

        import lmforge

        return mlflow.pytorch.log_model(
            model,
            name=name,
            serialization_format="pickle",
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "numpy", "safetensors"],
            code_paths=[str(Path(lmforge.__file__).parent)],
            registered_model_name=registered_name,
        )


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, BaseModel],
    inputs: list[str | Path],
    root: Path | None = None,
    resume_run_id: str | None = None,
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage (experiment `lmforge`, run name = stage).

    `resume_run_id`: continue that run (a training stage resumed after a kill logs into the
    run it started, so its curve is one line in the UI) when it exists in this store.
    """
    import mlflow

    root = (root or Path.cwd()).resolve()
    logging.getLogger("alembic").setLevel(logging.WARNING)
    experiment_id = _ensure_experiment(root)
    hashes = input_hashes(inputs, root)
    tags = {
        "lmforge.stage": stage,
        "mlflow.source.git.commit": git_commit(root),
        **{f"lmforge.input.{path}": digest for path, digest in hashes.items()},
    }
    flat_params = {}
    for section, model in params.items():
        flat_params.update(flatten(model.model_dump(mode="json"), f"{section}."))
    # MLflow params are strings of bounded length; lists and dicts become JSON.
    logged = {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in flat_params.items()}
    start: dict[str, Any] = {"experiment_id": experiment_id, "run_name": stage}
    if resume_run_id and _run_exists(resume_run_id, experiment_id):
        if mlflow.get_run(resume_run_id).data.params == logged:
            start = {"run_id": resume_run_id}
        else:  # MLflow params are immutable: a resume with other params is a new, linked run
            tags["lmforge.continues_run"] = resume_run_id
    with mlflow.start_run(**start, tags=tags) as run:
        mlflow.log_params(logged)
        mlflow.log_dict({"stage": stage, "inputs": hashes}, "lineage.json")
        yield StageRun(run.info.run_id)
