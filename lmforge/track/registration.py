"""A training stage's exported model into the registry, done by the tracking agent from the files
the stage linked into its live journal (lmforge.track.live): loaded as the stage exported it, logged
as MLflow's pytorch flavour (pt2, traced on the stage's input example) and registered as a new
version, described and tagged with the md5 of its weights (how evaluate and promote find it), its
figures and its lineage. The exported directory travels with it (`extra_files/`), so promote can
re-score it from the files the stage wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lmforge.core.digests import content_hash
from lmforge.core.paths import WEIGHTS_TAG
from lmforge.track.run_handle import StageRun


def _loaders() -> dict[str, Callable[[Path], Any]]:
    """How each exported directory is read back: name -> directory -> the torch module."""
    from lmforge.model.export import load_pretrained, read_finetuned

    return {"pretrained": lambda directory: load_pretrained(directory)[0],
            "finetuned": lambda directory: read_finetuned(directory)[0]}


def model_signature(inputs: Mapping[str, tuple[str, tuple[int, ...]]],
                    outputs: Mapping[str, tuple[str, tuple[int, ...]]]) -> Any:
    """An MLflow signature from {name: (numpy dtype, shape)} of the tensors in and out (-1: any size)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def schema(tensors: Mapping[str, tuple[str, tuple[int, ...]]]) -> Schema:
        return Schema([TensorSpec(np.dtype(dtype), tuple(shape), name) for name, (dtype, shape) in tensors.items()])

    return ModelSignature(inputs=schema(inputs), outputs=schema(outputs))


def register_exported(run: StageRun, directory: Path, spec: Mapping[str, Any]) -> str | None:
    """A new registered version of the model exported in `directory` (spec: loader, name, weights
    file, description, figures, signature, input_example as [dtype, nested list] per input, lineage
    tags); None when tracking fails. Once per run and weights: a journal written again (its agent
    was killed mid-way) or a finished run resumed to the same end registers no second version."""
    import numpy as np

    name, figures = spec["name"], spec["figures"]
    weights = content_hash(directory / spec["weights"])
    if (done := run.find_model_version(name, WEIGHTS_TAG, weights, run_id=run.run_id)) is not None:
        return done
    loaders = _loaders()
    if spec["loader"] not in loaders:
        raise ValueError(f"unknown model loader {spec['loader']!r}: one of {sorted(loaders)}")
    model = loaders[spec["loader"]](directory)
    arrays = [np.array(values, dtype=dtype) for dtype, values in spec["input_example"]]
    example = arrays[0] if len(arrays) == 1 else tuple(arrays)
    exported = [path for path in sorted(directory.iterdir()) if path.is_file()]
    version = run.log_torch_model(model, name, signature=model_signature(*spec["signature"]), input_example=example,
                                  description=spec["description"], extra_files=exported)
    if version is None:
        return None
    run.tag_model_version(name, version, {WEIGHTS_TAG: weights,
                                          "lmforge.run_id": str(run.run_id),
                                          **{f"{run.stage}.{k}": f"{v:.6g}" for k, v in figures.items()}})
    run.describe_model_version(name, version, f"From the `{run.stage}` run {run.run_id}: " +
                               ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))
    run.tag_model_version(name, version, spec["tags"])
    return version
