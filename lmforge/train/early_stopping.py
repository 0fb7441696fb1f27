"""Best weights and early stopping by one validation metric, as a piece of training state: the
trainer calls it after each eval and checkpoints its `state_dict` with everything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from lmforge.train.checkpoint import CheckpointManager
from lmforge.core.errors import LmforgeError


class EarlyStopping:
    """Keep the weights of the best eval by `metric` (lower is better for mode "min"), and stop
    after `patience` evals without improvement (0: never stop early).

    The best weights live in memory (trainable parameters; one process) and, when the trainer has
    a checkpoint directory, in `<checkpoint_dir>/best`, so a resumed or FSDP run still ends with them.
    """

    def __init__(self, metric: str, mode: Literal["min", "max"] = "min", patience: int = 0) -> None:
        if mode not in ("min", "max"):
            raise LmforgeError(f"early stopping mode {mode!r} is not one of min, max")
        if patience < 0:
            raise LmforgeError(f"patience must be >= 0 (got {patience})")
        self.metric, self.mode, self.patience = metric, mode, patience
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_metrics: dict[str, float] = {}
        self.bad_evals = 0
        self.stopped = False
        self.checkpoints: CheckpointManager | None = None
        self._weights: dict[str, torch.Tensor] | None = None

    def improved(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value < self.best_value if self.mode == "min" else value > self.best_value

    def update(self, step: int, val: dict[str, float], model: nn.Module, save_best: Callable[[], Any],
               distributed: bool, device: torch.device) -> None:
        """After an eval (its metrics already all-reduced): keep the best weights, count evals
        without improvement, decide to stop. The decision is broadcast from rank 0 so every rank
        leaves the loop at the same step (no collective left waiting)."""
        if self.metric not in val:
            raise LmforgeError(f"early stopping metric {self.metric!r} is not among the validation metrics {sorted(val)}")
        value = float(val[self.metric])
        if math.isfinite(value) and self.improved(value):
            self.best_value, self.best_step, self.best_metrics = value, step, dict(val)
            self.bad_evals = 0
            # Under FSDP some parameters may be unsharded right after an eval forward: there the
            # best weights come back from the DCP copy in <checkpoint_dir>/best instead.
            self._weights = None if distributed else {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
            }
            if self.checkpoints is not None:
                save_best()
        else:
            self.bad_evals += 1
        stop = torch.tensor([1.0 if self.patience and self.bad_evals >= self.patience else 0.0], device=device)
        if distributed:
            dist.broadcast(stop, src=0)
        self.stopped = bool(stop.item())

    @torch.no_grad()
    def restore(self, model: nn.Module) -> int | None:
        """Load the best weights seen (memory, else `<checkpoint_dir>/best`); returns their step."""
        if self.best_step is None:
            return None
        if self._weights is not None:
            for name, p in model.named_parameters():
                if name in self._weights:
                    p.copy_(self._weights[name])
        elif self.checkpoints is not None and self.checkpoints.latest() is not None:
            self.checkpoints.load(model, None)
        else:
            raise LmforgeError(
                f"the best weights (step {self.best_step}) are gone: {self.checkpoints and self.checkpoints.root} "
                "is missing; delete the checkpoints to train again"
            )
        return self.best_step

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.best_value, "step": self.best_step, "metrics": self.best_metrics,
                "bad_evals": self.bad_evals, "stopped_early": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value, self.best_step = state.get("value"), state.get("step")
        self.best_metrics = state.get("metrics") or {}
        self.bad_evals = int(state.get("bad_evals") or 0)
        self.stopped = bool(state.get("stopped_early"))
