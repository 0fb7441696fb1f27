"""The skeleton both training stages share: claim the checkpoint directory, open the MLflow run on
rank 0 (continuing the run a resumed checkpoint belongs to: its key is kept in the checkpoints'
run.json), keep the per-step curve beside the checkpoints, then report, log, tag and register the
exported model (finish), tear the process group down. Each stage says only what differs.

The run is written by the workspace's tracking agent while the stage trains (lmforge.track.live):
no MLflow in the training process, and the model is registered by the agent from the exported files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmforge.train.curves import CurveLog
from lmforge.train.report import Registration, TrainingReport, write_reports
from lmforge.train.distributed import DistInfo, barrier, destroy
from lmforge.train.resume import check_shared, claim_run_dir, remember_run_key
from lmforge.core.errors import RunInterrupted
from lmforge.track.lineage import DATA_LINEAGE, dataset_source, dvc_remote_url, git_commit, input_hashes
from lmforge.core.params import load_params
from lmforge.track.live import LiveRun, new_key
from lmforge.track.run_handle import StageRun
from lmforge.track.runs import FLOW_RUN_ENV, PARENT_RUN_ENV, stage_run


@dataclass
class TrainingRun:
    """What a training stage holds while it trains: `run` is the MLflow run on rank 0 (a StageRun that
    logs nothing when tracking is down), None elsewhere."""

    info: DistInfo
    run: LiveRun | StageRun | None
    curve: CurveLog
    renames: Mapping[str, str | None] = field(default_factory=dict)  # None: not recorded

    def on_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """The trainer's per-step sink (rank 0 only, the trainer's rule): curve file and MLflow."""
        named = {self.renames.get(k, k): v for k, v in metrics.items() if self.renames.get(k, k) is not None}
        self.curve.append(step, named)
        if self.run is not None:
            self.run.log_metrics({k: v for k, v in named.items() if v is not None}, step=step)


@contextlib.contextmanager
def training_run(stage: str, info: DistInfo, checkpoints: Path, fingerprint: dict[str, Any], resume: str,
                 sections: Mapping[str, BaseModel | Mapping[str, Any]], inputs: list[str | Path],
                 renames: Mapping[str, str | None] | None = None) -> Iterator[TrainingRun]:
    """Keep `checkpoints` for this same run (fingerprint) or start it fresh, then open the stage's
    MLflow run on rank 0; every rank enters, and leaves with the process group destroyed."""
    key = None
    if info.is_main:  # the run a resumed checkpoint belongs to, or a new one
        key = claim_run_dir(checkpoints, fingerprint, resume) or new_key()
        remember_run_key(checkpoints, key)
    barrier()
    if os.environ.get("LOCAL_WORLD_SIZE", str(info.world_size)) != str(info.world_size):  # several nodes
        check_shared(checkpoints)
    curve = CurveLog(checkpoints / "curve.jsonl")
    opened = (stage_run(stage, sections, inputs, system_metrics=True, live_key=key) if info.is_main
              else contextlib.nullcontext())
    with opened as run:
        try:
            yield TrainingRun(info, run, curve, dict(renames or {}))
        except Exception as exc:
            lost = lost_peers(exc, info)
            if lost is None:
                raise
            raise RunInterrupted(lost) from None  # the MLflow run ends FAILED on the way out
    destroy()


def lost_peers(exc: BaseException, info: DistInfo) -> str | None:
    """What to say when a collective failed because another process of the run is gone (killed, its
    node down: gloo's "Connection closed/reset by peer", torch's DistError), else None."""
    import torch.distributed as dist

    if info.world_size < 2 or not (isinstance(exc, dist.DistError) or "gloo/transport" in str(exc)):
        return None
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    cause = cause.split("] ", 1)[-1].split(" This is typically", 1)[0].rstrip(".")  # gloo's source and advice
    return (f"rank {info.rank} of {info.world_size} lost the run's other processes ({cause}): a process or a node "
            "died. Start the stage again on every node; it resumes from its last checkpoint")


def finish(run: LiveRun | StageRun, step: int, report: TrainingReport, registration: Registration) -> None:
    """The training stages' ending on rank 0: the reports written, the final figures, tags,
    description and artifacts on the run, and the exported model handed to the agent to register
    (lmforge.track.registration: a version described, tagged with its weights' md5, its figures and
    its lineage). Nothing but the reports when tracking is down."""
    write_reports(report)
    if not isinstance(run, LiveRun):
        return
    summary = report.summary
    # The losses are already in the per-step history; the rest lands at the final step.
    run.log_metrics({key: summary[key] for key in report.final if summary.get(key) is not None}, step=step)
    run.set_tags({f"lmforge.{key}": summary.get(key) for key in report.tagged})
    run.describe(report.description)
    for folder, files in report.artifacts.items():
        for path in files:
            run.log_artifact(path, folder)
    r = registration
    lineage = record_lineage(run, Path.cwd(), r.datasets or {})
    run.register_model(r.weights.parent, {
        "loader": r.loader, "name": r.name, "weights": r.weights.name, "description": r.description,
        "figures": {key: value for key, value in r.figures.items() if value is not None},
        "signature": r.signature, "input_example": [[array.dtype.name, array.tolist()] for array in r.input_example],
        "tags": lineage})


def lineage_tags(root: Path, data: Mapping[str, str], sources: Mapping[str, str], params: Mapping[str, Any]) -> dict[str, str]:
    """The tags `lineage.*` of a registered version: code, data (DVC hash and where to fetch it),
    the params of every stage (their md5; the values are the run's artifact lineage/params.json),
    and the runs it came from (the flow's `pipeline` run and Prefect flow run, when run by the flow)."""
    tags = {"lineage.git_commit": git_commit(root),
            "lineage.params_md5": hashlib.md5(json.dumps(params, sort_keys=True).encode()).hexdigest()}
    for name, digest in data.items():
        tags[f"lineage.data.{name}"] = digest
        tags[f"lineage.data.{name}.source"] = sources[name]
    for tag, env in (("lineage.parent_run_id", PARENT_RUN_ENV), ("lineage.prefect_flow_run_id", FLOW_RUN_ENV)):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def record_lineage(run: LiveRun, root: Path, datasets: Mapping[str, Path]) -> dict[str, str]:
    """Log what the model was made from on its run (every stage's params as lineage/params.json; the
    data as MLflow input datasets, source the DVC remote's object, digest the DVC hash) and return
    the version's lineage tags. `datasets`: the stage's own inputs beyond the data stages' outputs."""
    params = load_params().model_dump(mode="json")
    located = {**DATA_LINEAGE, **datasets}
    hashes = input_hashes(list(located.values()), root)
    digests = {name: hashes[os.path.normpath(str(path))] for name, path in located.items()}
    remote = dvc_remote_url(root)
    sources = {name: dataset_source(located[name], digest, remote, root) for name, digest in digests.items()}
    run.log_dict(params, "lineage/params.json")
    run.log_datasets({name: (sources[name], digest) for name, digest in digests.items()}, context="lineage")
    return lineage_tags(root, digests, sources, params)
