"""The skeleton both training stages share: claim the checkpoint directory, open the MLflow run on
rank 0 (continuing the run a resumed checkpoint belongs to), keep the per-step curve beside the
checkpoints, register the exported model, tear the process group down. Each stage says only what differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from torch import nn

from lmforge.curves import CurveLog
from lmforge.parallelize import DistInfo, barrier, destroy
from lmforge.resume import claim_run_dir, remember_run_id
from lmforge.lineage import content_hash
from lmforge.tracking import StageRun, stage_run

# Tag of each registered model version: the md5 of the model.safetensors it was logged from
# (how the evaluate stage finds the version of the weights it scored).
WEIGHTS_TAG = "lmforge.weights_md5"


@dataclass
class TrainingRun:
    """What a training stage holds while it trains: `run` is the MLflow run on rank 0, None elsewhere."""

    info: DistInfo
    run: StageRun | None
    curve: CurveLog
    renames: Mapping[str, str] = field(default_factory=dict)

    def on_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """The trainer's per-step sink (rank 0 only, the trainer's rule): curve file and MLflow."""
        named = {self.renames.get(k, k): v for k, v in metrics.items()}
        self.curve.append(step, named)
        if self.run is not None:
            self.run.log_metrics({k: v for k, v in named.items() if v is not None}, step=step)


@contextlib.contextmanager
def training_run(stage: str, info: DistInfo, checkpoints: Path, fingerprint: dict[str, Any], resume: str,
                 sections: Mapping[str, BaseModel | Mapping[str, Any]], inputs: list[str | Path],
                 renames: Mapping[str, str] | None = None) -> Iterator[TrainingRun]:
    """Keep `checkpoints` for this same run (fingerprint) or start it fresh, then open the stage's
    MLflow run on rank 0; every rank enters, and leaves with the process group destroyed."""
    resume_run_id = claim_run_dir(checkpoints, fingerprint, resume) if info.is_main else None
    barrier()
    curve = CurveLog(checkpoints / "curve.jsonl")
    opened = stage_run(stage, sections, inputs, resume_run_id=resume_run_id) if info.is_main else contextlib.nullcontext()
    with opened as run:
        if run is not None and run.run_id is not None:
            remember_run_id(checkpoints, run.run_id)
        yield TrainingRun(info, run, curve, dict(renames or {}))
    destroy()


def model_signature(inputs: dict[str, tuple[str, tuple[int, ...]]], outputs: dict[str, tuple[str, tuple[int, ...]]]) -> Any:
    """An MLflow signature from {name: (numpy dtype, shape)} of the tensors in and out (-1: any size)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def schema(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> Schema:
        return Schema([TensorSpec(np.dtype(dtype), shape, name) for name, (dtype, shape) in tensors.items()])

    return ModelSignature(inputs=schema(inputs), outputs=schema(outputs))


def register(run: StageRun, model: nn.Module, name: str, weights: Path, *, description: str,
             figures: Mapping[str, float | None], signature: Any = None, input_example: Any = None) -> str | None:
    """A new registered version of `model` named `name`, described, tagged with the md5 of `weights`
    (how evaluate finds it) and with its own `figures`; None when tracking is down."""
    logged = run.log_torch_model(model, name, signature=signature, input_example=input_example,
                                 description=description)
    version = getattr(logged, "registered_model_version", None)
    if version is None:
        return None
    shown = {key: value for key, value in figures.items() if value is not None}
    run.tag_model_version(name, str(version), {WEIGHTS_TAG: content_hash(weights), "lmforge.run_id": str(run.run_id),
                                               **{f"{run.stage}.{k}": f"{v:.6g}" for k, v in shown.items()}})
    run.describe_model_version(name, str(version), f"From the `{run.stage}` run {run.run_id}: " +
                               ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    return str(version)
