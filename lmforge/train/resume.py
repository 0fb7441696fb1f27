"""Which checkpoints a training stage may resume: a run directory holds `run.json` with the
fingerprint of what the run computes (params, weights, data) and its MLflow run id.

Resuming must give what an uninterrupted run would, so every knob that changes the result is
in the fingerprint; a mismatch moves the old checkpoints aside (`<dir>.stale`, which keeps the one
previous run's; beside the link's target when `<dir>` is a symlink, so they stay on the same disk).
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmforge.core.io import write_json
from lmforge.core.errors import LmforgeError
from lmforge.core.params import flatten

log = logging.getLogger(__name__)
MARKER = "run.json"
# How a run executes (checkpoints, progress, processes, compile...) is in params.yaml's `runtime:`
# (lmforge.core.params.RuntimeParams), outside the stage's section. Of the section, the test file
# changes nothing a training run computes (finetune reads it to check its labels), and
# tensor_parallel is a layout like runtime.pretrain.nproc (it moves only the rounding of sums): a
# checkpoint written at one loads at another (DCP reshards), so changing it resumes the run.
NOT_COMPUTED_FROM = frozenset({"test_file", "tensor_parallel"})


def result_knobs(section: BaseModel) -> dict[str, Any]:
    """A stage's params section without the knobs its result does not depend on."""
    return {k: v for k, v in section.model_dump(mode="json").items() if k not in NOT_COMPUTED_FROM}


def claim_run_dir(root: Path, fingerprint: dict[str, Any], resume: str) -> str | None:
    """Keep `root`'s checkpoints when they belong to this same run (returning its tracking key, so
    its MLflow run goes on: lmforge.track.live); otherwise move them aside and start fresh. A `root` that is
    a symlink (checkpoints kept on a bigger disk) stays one: the work happens in its target."""
    directory = _run_dir(root)
    marker = directory / MARKER
    if directory.exists() and marker.is_file():
        previous = json.loads(marker.read_text())
        if resume == "auto" and previous.get("fingerprint") == fingerprint:
            # an lmforge before run keys kept the MLflow run id: the agent takes either
            return previous.get("tracking_key") or previous.get("mlflow_run_id")
        now, before = flatten(fingerprint), flatten(previous.get("fingerprint", {}))
        changed = sorted(key for key in set(now) | set(before) if now.get(key) != before.get(key))
        reason = "resume is 'never'" if resume != "auto" else f"{', '.join(changed)} changed"
        stale = directory.with_name(directory.name + ".stale")
        log.warning("%s: moving the old checkpoints in %s to %s and starting fresh", reason, root, stale)
        if stale.is_symlink() or stale.is_file():  # a link an older lmforge moved aside: its target stays
            stale.unlink()
        elif stale.exists():
            shutil.rmtree(stale)
        directory.rename(stale)
    elif directory.exists() and any(directory.iterdir()):
        raise LmforgeError(f"{root} holds files without a {MARKER}: move them away or delete the directory")
    directory.mkdir(exist_ok=True)
    # The nonce names this run as the writer of its checkpoints (lmforge.train.checkpoint refuses others).
    write_json(marker, {"fingerprint": fingerprint, "tracking_key": None, "nonce": secrets.token_hex(16)})
    return None


def _run_dir(root: Path) -> Path:
    """The directory the run's checkpoints live in: `root`, or the target of the link `root` is
    (made when missing, as long as the directory it goes in exists: an unmounted disk is named)."""
    try:
        directory = root.resolve() if root.is_symlink() else root
    except (OSError, RuntimeError) as exc:  # a loop of links
        raise LmforgeError(f"{root} is a link that cannot be followed ({exc}): point it at a directory") from None
    if directory.exists() and not directory.is_dir():
        raise LmforgeError(f"{root} is not a directory: move that file away, or point {root} at a directory")
    if directory != root and not directory.parent.is_dir():
        raise LmforgeError(f"{root} links to {directory}, whose directory {directory.parent} does not exist: "
                           "mount the disk it is on, or point the link elsewhere")
    directory.parent.mkdir(parents=True, exist_ok=True)
    return directory


def run_record(root: Path) -> dict[str, Any]:
    """What `root`'s run.json says (fingerprint, tracking_key, nonce); {} when `root` is no run directory."""
    marker = root / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else {}


def remember_run_key(root: Path, key: str) -> None:
    """The key of the MLflow run these checkpoints belong to (the agent tags the run with it)."""
    marker = root / MARKER
    write_json(marker, {**json.loads(marker.read_text()), "tracking_key": key})


def check_still_claimed(marker: Path | None, step: int) -> None:
    """Stop when the run directory whose `marker` a run holds was deleted under it (before `step`):
    going on would write a curve and checkpoints that no later run could trust."""
    if marker is not None and not marker.is_file():
        raise LmforgeError(
            f"{marker.parent} was deleted while training (before step {step}); its "
            "checkpoints and curve are gone, so this run stops here. Rerun the stage to start from step 0 "
            f"(remove what is left first: rm -rf {marker.parent})"
        )


def check_shared(root: Path) -> None:
    """With several nodes, stop on every rank, before any training, unless each sees the run.json
    rank 0 just wrote in `root`: a checkpoint is the shards of every rank in one directory (DCP), so
    `root` must be one directory for all (a shared file system, or a link to one, on every node)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    nonce = [run_record(root).get("nonce") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(nonce, src=0)
    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, run_record(root).get("nonce") == nonce[0])
    blind = [rank for rank, ok in enumerate(seen) if not ok]
    if blind:
        raise LmforgeError(
            f"{root} is not the same directory on every node: rank(s) {blind} do not see the {MARKER} rank 0 "
            f"wrote there. A checkpoint holds every rank's shards in one directory, so with several nodes put the "
            f"checkout on a shared file system, or link {root} to one shared directory on every node"
        )
