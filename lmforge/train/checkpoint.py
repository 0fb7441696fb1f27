"""Training checkpoints: model + optimizer as sharded DCP, the rest (step, data position, RNG) as JSON.

Each is written to `step_XXXXXXXX.tmp` and renamed when complete; the last K are kept; loading falls
back to the previous checkpoint, with a warning naming the bad one. One format serves 1..N processes.
DCP's metadata file is a pickle, so a checkpoint is loaded only when its `checksums.json` names this
run as its writer (`owner`, the run directory's nonce) and every file still has its recorded sha256.
With `async_save`, DCP stages a CPU copy of the state and writes it in a background thread while
training goes on; checksums and the rename follow the write, so a process killed mid-write leaves
only a `.tmp` behind and the previous checkpoint stays the newest loadable one.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lmforge.core.digests import file_sha256
from lmforge.core.errors import LmforgeError, disk_full, naming_full_disk
from lmforge.train.distributed import barrier

PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"
CHECKSUMS = "checksums.json"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# DCP warns that it "assumes a single process" when no group exists: that is the intent here. A
# process-wide filter, as the warning also comes from DCP's background writer thread.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


# --- RNG state, per rank, as JSON (no pickles) ---------------------------------------------------

def _tensor_to_text(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _text_to_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: python, numpy, torch CPU and (if present) CUDA."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *[v for v in np_state[2:]]],
        "torch": _tensor_to_text(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _tensor_to_text(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_text_to_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_text_to_tensor(state["cuda"]))


# --- what a checkpoint holds: its files' sha256, checked before anything is unpickled -------------

def _checksums(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `directory` but the checksum list itself."""
    return {path.relative_to(directory).as_posix(): file_sha256(path)
            for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS)}


# --- the manager -----------------------------------------------------------------------------------

@dataclass
class Restored:
    """What `CheckpointManager.load` gives back besides the model/optimizer it filled in place."""

    path: Path
    step: int
    extra: dict[str, Any] = field(default_factory=dict)


class CheckpointManager:
    """Save, find and load checkpoints under `root`; every method is collective under a process group."""

    def __init__(self, root: str | Path, keep: int = 2, owner: str | None = None, async_save: bool = False) -> None:
        """`owner`: the writer's identity recorded in every checkpoint and required to load one.
        `async_save`: `save` returns once the state is staged; `wait` (or the next save) joins the write."""
        if keep < 1:
            raise LmforgeError(f"keep_checkpoints must be >= 1 (got {keep})")
        self.root = Path(root)
        self.keep = keep
        self.owner = owner
        self.async_save = async_save
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._group: Any = None  # a gloo group of its own: the background write must not share NCCL's

    def path_for(self, step: int) -> Path:
        return self.root / f"{PREFIX}{step:08d}"

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first (a `.tmp` dir is an interrupted save and is ignored)."""
        if not self.root.is_dir():
            return []
        found = [
            p for p in self.root.iterdir()
            if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp")
            and p.name[len(PREFIX):].isdigit()
        ]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def save(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]
    ) -> Path:
        """Write step `step`: model and optimizer shards (DCP), `extra` (JSON, rank 0), RNG (JSON, per rank).

        Waits for the previous background write first; with `async_save`, returns before this one is
        on disk (the returned path exists once `wait` returns)."""
        self.wait()
        final = self.path_for(step)
        tmp = final.with_name(final.name + ".tmp")
        if _rank() == 0:
            for stale in self.root.glob(f"{PREFIX}*.tmp"):
                shutil.rmtree(stale)  # left by saves that were killed
            tmp.mkdir(parents=True)
        barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with naming_full_disk(final, check_free=True):
            (tmp / f"rng_rank{_rank()}.json").write_text(json.dumps(rng_state()))
            if _rank() == 0:
                (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **extra}, indent=2))
        state = {"model": model_sd, "optim": optim_sd}
        if not self.async_save:
            with naming_full_disk(final, check_free=True):
                dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())
                self._commit(tmp, final, None)
            return final
        if _distributed() and self._group is None:
            self._group = dist.new_group(backend="gloo")
        # Returns once a CPU copy is staged: the optimizer may change the live tensors from here on.
        future = dcp.async_save(state, checkpoint_id=str(tmp), no_dist=not _distributed(),
                                process_group=self._group)
        self._writer = threading.Thread(target=self._finish, args=(future, tmp, final),
                                        name="lmforge-checkpoint", daemon=True)
        self._writer.start()
        return final

    def _finish(self, future: Any, tmp: Path, final: Path) -> None:
        try:
            with naming_full_disk(final, check_free=True):
                future.result()
                self._commit(tmp, final, self._group)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Join the background write, if any; raise what it raised."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            if disk_full(error) is not None:
                raise error  # the stage runner's one line: no space left on device writing <checkpoint>
            raise LmforgeError(f"a background checkpoint write under {self.root} failed: {error}") from error

    def _commit(self, tmp: Path, final: Path, group: Any) -> None:
        # Only when every rank has written is the directory renamed into place: that rename is the commit.
        barrier(group)
        if _rank() == 0:
            (tmp / CHECKSUMS).write_text(json.dumps({"owner": self.owner, "files": _checksums(tmp)}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(group)

    def verify(self, path: Path) -> None:
        """Refuse a checkpoint this run did not write, or one changed since: DCP's metadata is a
        pickle, and unpickling a file someone else wrote can run their code."""
        listed = path / CHECKSUMS
        if not listed.is_file():
            raise LmforgeError(f"{path} has no {CHECKSUMS}: not written by lmforge (or by an older version); "
                               "refusing to unpickle it")
        record = json.loads(listed.read_text())
        if self.owner is not None and record.get("owner") != self.owner:
            raise LmforgeError(f"{path} was written by another run (owner {record.get('owner')!r}, this run "
                               f"{self.owner!r}); refusing to unpickle it")
        if record.get("files") != _checksums(path):
            raise LmforgeError(f"{path}: its files differ from their recorded sha256 (changed or incomplete); "
                               "refusing to unpickle it")

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Restored | None:
        """Fill model/optimizer from the newest loadable checkpoint and restore this rank's RNG.

        A checkpoint that fails to load is reported by name and the previous one is tried.
        Returns None when there is none at all.
        """
        candidates = self.complete()
        for path in reversed(candidates):
            try:
                return self._load_one(path, model, optimizer)
            # DCP's CheckpointException derives from BaseException, not Exception.
            except (Exception, CheckpointException) as exc:  # noqa: BLE001 - any failure: try the older one
                warnings.warn(
                    f"checkpoint {path} could not be loaded ({type(exc).__name__}: {exc}); "
                    "falling back to the previous checkpoint",
                    stacklevel=2,
                )
        if candidates:
            raise LmforgeError(
                f"no checkpoint under {self.root} could be loaded (tried {[p.name for p in candidates]}): "
                "delete the directory to start from scratch, or set resume to 'never'"
            )
        return None

    def _load_one(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Restored:
        self.verify(path)
        meta = json.loads((path / TRAINER_STATE).read_text())
        if optimizer is None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

            state: dict[str, Any] = {"model": get_model_state_dict(model)}
            dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
            set_model_state_dict(model, state["model"])
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng_file = path / f"rng_rank{_rank()}.json"
        if rng_file.exists():
            set_rng_state(json.loads(rng_file.read_text()))
        else:
            # A rank that did not exist when the checkpoint was written (world size grew).
            warnings.warn(f"{path} has no RNG state for rank {_rank()}; keeping this process's seed", stacklevel=3)
        step = int(meta.pop("step"))
        return Restored(path=path, step=step, extra=meta)
