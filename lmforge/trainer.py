"""The one training loop (pretraining and fine-tuning): precision, accumulation, LR schedule, eval, metrics,
early stopping on a validation metric with the best weights kept.

The objective (`loss_fn`), the batch builder (`collate`), extra validation metrics (`eval_fn`) and the
metrics sink (`on_metrics`) are pluggable. Rows are packed token arrays by default (pretraining); with
`seq_len=` given they may be anything `collate` understands (fine-tuning examples).
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmforge.checkpoint import CheckpointManager
from lmforge.errors import LmforgeError
from lmforge.model import IGNORE_INDEX
from lmforge.parallelize import DistInfo, init_distributed
from lmforge.runs import MARKER as RUN_MARKER, run_nonce

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
# (model, batch) -> (summed loss over counted tokens, number of counted tokens)
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, int | torch.Tensor]]
Collate = Callable[[list[Any]], Batch]
MetricsCallback = Callable[[int, dict[str, float | None]], None]
# (model, batch) -> {metric name: (summed numerator, denominator)}; summed over val batches and ranks,
# the metric is numerator / denominator (e.g. {"val_accuracy": (correct, examples)}).
EvalFn = Callable[[nn.Module, Batch], dict[str, tuple[torch.Tensor | float, torch.Tensor | float]]]

# Dense bf16 tensor-core peak FLOP/s per device, matched by substring of torch.cuda.get_device_name().
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


class RowDataset(Protocol):
    """Rows of packed token ids: `__getitem__(i)` is an int array of length seq_len + 1."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Any: ...


@dataclass(frozen=True)
class TrainConfig:
    """Knobs of the loop; field names match `lmforge.params.PretrainParams` (minus the parallelize ones)."""

    max_steps: int = 200
    # Optional token budget: training stops at whichever of max_steps / max_tokens comes first.
    max_tokens: int | None = None
    micro_batch_size: int = 16
    grad_accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still reported)
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    eval_every: int = 50  # 0: only at the end
    eval_batches: int = 8
    checkpoint_every: int = 50  # 0: only at the end
    keep_checkpoints: int = 2
    resume: Literal["auto", "never"] = "auto"
    seed: int = 1337
    progress: bool = True
    # Early stopping / best weights: a validation metric name (val_loss or one of eval_fn's), whether
    # lower ("min") or higher ("max") is better, and how many evals without improvement end the run
    # (0: never stop early). With best_metric set, fit() ends with the best weights loaded.
    best_metric: str | None = None
    best_mode: Literal["min", "max"] = "min"
    patience: int = 0


@dataclass
class TrainResult:
    step: int
    train_loss: float | None
    val_loss: float | None
    val_ppl: float | None
    tokens_seen: int
    checkpoint: Path | None
    val_metrics: dict[str, float] = field(default_factory=dict)  # the last eval
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)  # the eval at best_step
    stopped_early: bool = False


def lm_collate(rows: list[Any]) -> Batch:
    """Packed rows -> next-token inputs and targets."""
    x = torch.from_numpy(np.stack([np.asarray(r, dtype=np.int64) for r in rows]))
    return {"inputs": x[:, :-1], "targets": x[:, 1:]}


def lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the count of targets that are not IGNORE_INDEX."""
    logits = model(batch["inputs"])
    targets = batch["targets"]
    loss_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return loss_sum, (targets != IGNORE_INDEX).sum()


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Multiplier of cfg.lr after `step` optimizer steps: linear warmup, then cosine to min_lr."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class RowSampler:
    """A global stream of row indices: epoch e is a permutation seeded by (seed, e), epochs back to back.

    Position p (rows consumed so far, over all ranks) is the whole data state: epoch = p // n,
    index = p % n. Each optimizer step takes the next `global batch` rows and deals them to ranks
    in disjoint micro-batches, so N ranks see every row exactly once per epoch.
    """

    def __init__(self, n_rows: int, seed: int) -> None:
        self.n_rows, self.seed = n_rows, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
        return self._perm

    def rows(self, start: int, count: int) -> list[int]:
        """Row ids at stream positions start .. start + count - 1."""
        out = []
        for p in range(start, start + count):
            epoch, index = divmod(p, self.n_rows)
            out.append(int(self._permutation(epoch)[index]))
        return out


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s, device name); None when the device is not in PEAK_FLOPS (CPUs never are)."""
    if device.type != "cuda":
        return None, "CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value, name
    return None, name


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Trainer:
    """Runs `config.max_steps` optimizer steps of `loss_fn` over `train_data`, resuming from checkpoints.

    `model` is already on `dist_info.device` and already parallelized (apply_fsdp etc.), or plain.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: RowDataset,
        val_data: RowDataset | None = None,
        *,
        dist_info: DistInfo | None = None,
        checkpoint_dir: str | Path | None = None,
        loss_fn: LossFn = lm_loss,
        collate: Collate = lm_collate,
        on_metrics: MetricsCallback | None = None,
        flops_per_token: float | None = None,
        eval_fn: EvalFn | None = None,
        seq_len: int | None = None,
    ) -> None:
        """`seq_len`: the (maximum) tokens per example when rows are not packed arrays (fine-tuning);
        it sizes the loss-scaling hint, the token budget and the FLOPs estimate."""
        self.model, self.cfg = model, config
        self.dist = dist_info or init_distributed()
        self.device = self.dist.device
        self.train_data, self.val_data = train_data, val_data
        self.loss_fn, self.collate, self.on_metrics, self.eval_fn = loss_fn, collate, on_metrics, eval_fn
        self._seq_len_given = seq_len
        self._check_config(checkpoint_dir)
        self.seq_len = self._check_data()
        self.rows_per_step = config.micro_batch_size * config.grad_accum_steps * self.dist.world_size
        if len(train_data) < self.rows_per_step:
            raise LmforgeError(
                f"the training data has {len(train_data)} rows but one optimizer step needs "
                f"{self.rows_per_step} (micro_batch_size {config.micro_batch_size} x grad_accum_steps "
                f"{config.grad_accum_steps} x {self.dist.world_size} processes): lower those, use fewer "
                "processes (nproc), or add data"
            )
        self.total_steps = config.max_steps
        if config.max_tokens is not None:
            self.total_steps = min(self.total_steps, math.ceil(config.max_tokens / (self.rows_per_step * self.seq_len)))
        if flops_per_token is None and hasattr(_unwrap(model), "config"):
            flops_per_token = _unwrap(model).config.flops_per_token(self.seq_len)
        self.flops_per_token = flops_per_token
        self.sampler = RowSampler(len(train_data), config.seed)
        self.data_position = 0
        self.step = 0
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_at(s, self.cfg, self.total_steps)
        )
        self.scaler = self._build_scaler()
        owner = run_nonce(Path(checkpoint_dir)) if checkpoint_dir else None
        self.checkpoints = CheckpointManager(checkpoint_dir, config.keep_checkpoints, owner) if checkpoint_dir else None
        # The best weights so far live in memory (trainable parameters only; one process) and, with a
        # checkpoint dir, in `<checkpoint_dir>/best` so that a resumed (or FSDP) run still ends with them.
        self.best_checkpoints = CheckpointManager(Path(checkpoint_dir) / "best", 1, owner) if checkpoint_dir else None
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_metrics: dict[str, float] = {}
        self.bad_evals = 0
        self.stopped_early = False
        self._best_state: dict[str, torch.Tensor] | None = None
        self._mfu_note_done = False
        # The last step's figures, checkpointed: a run resumed after it finished reports them again.
        self.train_loss: float | None = None
        self.val: dict[str, float] = {}
        # The run directory's marker (lmforge.runs): if it vanishes mid-run, the directory was deleted.
        marker = Path(checkpoint_dir) / RUN_MARKER if checkpoint_dir else None
        self._run_marker = marker if marker is not None and marker.is_file() else None

    # --- setup ---------------------------------------------------------------------------------

    def _check_config(self, checkpoint_dir: str | Path | None = None) -> None:
        cfg = self.cfg
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "eval_batches"):
            if getattr(cfg, name) < 1:
                raise LmforgeError(f"{name} must be >= 1 (got {getattr(cfg, name)})")
        if cfg.precision not in ("bf16", "fp16", "fp32"):
            raise LmforgeError(f"precision {cfg.precision!r} is not one of bf16, fp16, fp32")
        if cfg.resume not in ("auto", "never"):
            raise LmforgeError(f"resume {cfg.resume!r} is not one of auto, never")
        if cfg.best_mode not in ("min", "max"):
            raise LmforgeError(f"best_mode {cfg.best_mode!r} is not one of min, max")
        if cfg.patience < 0:
            raise LmforgeError(f"patience must be >= 0 (got {cfg.patience})")
        if cfg.best_metric is not None and self.val_data is None:
            raise LmforgeError(f"early stopping on {cfg.best_metric!r} needs validation data: pass val_data")
        if cfg.best_metric is not None and self.dist.distributed and checkpoint_dir is None:
            raise LmforgeError("keeping the best weights across processes needs a checkpoint_dir (its best/ copy)")

    def _check_data(self) -> int:
        if len(self.train_data) == 0:
            raise LmforgeError("the training data has no rows: check the tokenize stage's output")
        if self._seq_len_given is not None:  # examples of any form; the caller checked them
            if self._seq_len_given < 1:
                raise LmforgeError(f"seq_len must be >= 1 (got {self._seq_len_given})")
            return int(self._seq_len_given)
        first = np.asarray(self.train_data[0])
        if first.ndim != 1 or first.shape[0] < 2:
            raise LmforgeError(f"a training row must be a 1-D array of seq_len + 1 ids (got shape {first.shape})")
        seq_len = first.shape[0] - 1
        model_cfg = getattr(_unwrap(self.model), "config", None)
        if model_cfg is not None:
            if seq_len > model_cfg.max_seq_len:
                raise LmforgeError(
                    f"rows hold {seq_len} inputs but the model's max_seq_len is {model_cfg.max_seq_len}: "
                    "raise model max_seq_len or re-tokenize with a shorter seq_len"
                )
            vocab = getattr(self.train_data, "vocab_size", None)
            if vocab is not None:
                model_cfg.check_vocab(int(vocab))
            if int(first.max()) >= model_cfg.vocab_size:
                raise LmforgeError(
                    f"row 0 holds token id {int(first.max())} but the model embeds only {model_cfg.vocab_size}: "
                    "set the model's vocab_size to the tokenizer's"
                )
        return seq_len

    def _build_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Matrices (and embeddings) decay; norms and biases do not.
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        extra = {"fused": True} if self.device.type == "cuda" else {}
        return torch.optim.AdamW(
            groups, lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2), eps=1e-8, **extra
        )

    def _build_scaler(self) -> torch.amp.GradScaler | None:
        if self.cfg.precision != "fp16":
            return None
        if self.dist.distributed:
            # All-reduces found-inf across ranks, so every rank skips the same steps.
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(self.device.type)
        return torch.amp.GradScaler(self.device.type)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # --- data ----------------------------------------------------------------------------------

    def _to_device(self, batch: Batch) -> Batch:
        non_blocking = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=non_blocking) for k, v in batch.items()}

    def train_micro_batches(self, position: int) -> Iterator[Batch]:
        """This rank's micro-batches of the optimizer step that starts at stream `position`."""
        b, w, r = self.cfg.micro_batch_size, self.dist.world_size, self.dist.rank
        for m in range(self.cfg.grad_accum_steps):
            ids = self.sampler.rows(position + (m * w + r) * b, b)
            yield self._to_device(self.collate([self.train_data[i] for i in ids]))

    def val_micro_batches(self) -> Iterator[Batch]:
        """A fixed slice of the val rows (the first eval_batches global batches), disjoint across ranks."""
        assert self.val_data is not None
        b, w, r = self.cfg.micro_batch_size, self.dist.world_size, self.dist.rank
        n_batches = min(self.cfg.eval_batches, len(self.val_data) // (b * w))
        if n_batches == 0 and len(self.val_data) >= w:
            # Fewer val rows than one batch (a small fine-tuning split): one smaller batch per rank.
            b, n_batches = len(self.val_data) // w, 1
        if n_batches == 0:
            raise LmforgeError(
                f"the val data has {len(self.val_data)} rows, fewer than one batch over all processes "
                f"({b} x {w}): lower micro_batch_size or use fewer processes"
            )
        for k in range(n_batches):
            start = (k * w + r) * b
            yield self._to_device(self.collate([self.val_data[i] for i in range(start, start + b)]))

    # --- one optimizer step --------------------------------------------------------------------

    def _grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager[Any]:
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        if isinstance(self.model, nn.parallel.DistributedDataParallel) and not enabled:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _all_reduce_sum(self, values: list[float | torch.Tensor]) -> list[float]:
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(()) for v in values])
        if self.dist.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def compute_gradients(self, micro_batches: Sequence[Batch] | Iterator[Batch]) -> tuple[float, float]:
        """Accumulate into .grad the gradient of the mean loss over every counted token of every
        micro-batch on every rank; returns (mean loss, tokens counted over all ranks).

        Each micro-step backpropagates its summed loss / a fixed size hint (to keep fp16 in range);
        afterwards the grads are rescaled by hint * world_size / total tokens, which is exact even
        when the token counts of micro-batches differ (fine-tuning with ignored targets).
        """
        self.optimizer.zero_grad(set_to_none=True)
        batches = list(micro_batches)
        hint = float(self.cfg.micro_batch_size * self.seq_len)
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens_local = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            for m, batch in enumerate(batches):
                with self._grad_sync(m == len(batches) - 1):
                    with self.autocast():
                        loss_sum, n_tokens = self.loss_fn(self.model, batch)
                    scaled = loss_sum / hint
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                loss_total += loss_sum.detach().double()
                tokens_local += torch.as_tensor(n_tokens, device=self.device).double()
        except torch.OutOfMemoryError as exc:
            raise LmforgeError(
                f"micro_batch_size {self.cfg.micro_batch_size} x seq_len {self.seq_len} does not fit in "
                f"{self.device} memory: lower micro_batch_size and raise grad_accum_steps, or enable "
                "activation_checkpointing"
            ) from exc
        loss_sum_all, tokens_all = self._all_reduce_sum([loss_total, tokens_local])
        if tokens_all == 0:
            raise LmforgeError("an optimizer step had no target tokens: every target is ignored (-100)")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # FSDP/DDP average grads over ranks; undo that and divide by the global token count instead.
        factor = hint * self.dist.world_size / tokens_all
        if factor != 1.0:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)
        return loss_sum_all / tokens_all, tokens_all

    def optimizer_step(self) -> float:
        """Clip, step the optimizer and the LR schedule; returns the pre-clip grad norm."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    # --- eval ----------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and perplexity over the fixed val batches (all ranks), plus eval_fn's metrics."""
        self.model.eval()
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        extra: dict[str, list[torch.Tensor]] = {}
        for batch in self.val_micro_batches():
            with self.autocast():
                loss_sum, n_tokens = self.loss_fn(self.model, batch)
                parts = self.eval_fn(self.model, batch) if self.eval_fn is not None else {}
            loss_total += loss_sum.double()
            tokens += torch.as_tensor(n_tokens, device=self.device).double()
            for name, (num, den) in parts.items():
                acc = extra.setdefault(name, [torch.zeros((), dtype=torch.float64, device=self.device)] * 2)
                extra[name] = [acc[0] + torch.as_tensor(num, device=self.device).double(),
                               acc[1] + torch.as_tensor(den, device=self.device).double()]
        self.model.train()
        names = sorted(extra)
        reduced = self._all_reduce_sum([loss_total, tokens] + [v for n in names for v in extra[n]])
        loss = reduced[0] / max(reduced[1], 1.0)
        out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        for i, name in enumerate(names):
            out[name] = reduced[2 + 2 * i] / max(reduced[3 + 2 * i], 1e-12)
        return out

    # --- best weights and early stopping -------------------------------------------------------

    def _improved(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value < self.best_value if self.cfg.best_mode == "min" else value > self.best_value

    def _track_best(self, val: dict[str, float]) -> None:
        """After an eval: keep the best weights, count evals without improvement, decide to stop.

        The metric is already all-reduced; the stop decision is still broadcast from rank 0 so every
        rank leaves the loop at the same step (no collective left waiting).
        """
        name = self.cfg.best_metric
        if name is None:
            return
        if name not in val:
            raise LmforgeError(f"best_metric {name!r} is not among the validation metrics {sorted(val)}")
        value = float(val[name])
        if math.isfinite(value) and self._improved(value):
            self.best_value, self.best_step, self.best_metrics = value, self.step, dict(val)
            self.bad_evals = 0
            # Under FSDP some parameters may be unsharded right after an eval forward: there the
            # best weights come back from the DCP copy in <checkpoint_dir>/best instead.
            self._best_state = None if self.dist.distributed else {
                n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
            }
            if self.best_checkpoints is not None:
                self.best_checkpoints.save(self.step, self.model, self.optimizer, self._extra_state())
        else:
            self.bad_evals += 1
        stop = torch.tensor(
            [1.0 if self.cfg.patience and self.bad_evals >= self.cfg.patience else 0.0], device=self.device
        )
        if self.dist.distributed:
            dist.broadcast(stop, src=0)
        self.stopped_early = bool(stop.item())

    @torch.no_grad()
    def restore_best(self) -> int | None:
        """Load the best weights seen (memory, else `<checkpoint_dir>/best`); returns their step."""
        if self.best_step is None:
            return None
        if self._best_state is not None:
            for name, p in self.model.named_parameters():
                if name in self._best_state:
                    p.copy_(self._best_state[name])
        elif self.best_checkpoints is not None and self.best_checkpoints.latest() is not None:
            self.best_checkpoints.load(self.model, None)
        else:
            raise LmforgeError(
                f"the best weights (step {self.best_step}) are gone: {self.best_checkpoints and self.best_checkpoints.root} "
                "is missing; delete the checkpoints to train again"
            )
        return self.best_step

    # --- checkpoints ---------------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        n = len(self.train_data)
        return {
            "data_position": self.data_position,
            "epoch": self.data_position // n,
            "index": self.data_position % n,
            "rows_per_step": self.rows_per_step,
            "world_size": self.dist.world_size,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "train_config": asdict(self.cfg),
            "best": {"value": self.best_value, "step": self.best_step, "metrics": self.best_metrics,
                     "bad_evals": self.bad_evals, "stopped_early": self.stopped_early},
            "last": {"train_loss": self.train_loss, "val": self.val},
        }

    def save_checkpoint(self) -> Path | None:
        if self.checkpoints is None:
            return None
        return self.checkpoints.save(self.step, self.model, self.optimizer, self._extra_state())

    def maybe_resume(self) -> Path | None:
        """Load the newest checkpoint when resume == 'auto' and one exists."""
        if self.checkpoints is None or self.cfg.resume != "auto":
            return None
        restored = self.checkpoints.load(self.model, self.optimizer)
        if restored is None:
            return None
        extra = restored.extra
        self.step = restored.step
        self.data_position = int(extra["data_position"])
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.scaler is not None and extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        best = extra.get("best") or {}
        self.best_value, self.best_step = best.get("value"), best.get("step")
        self.best_metrics = best.get("metrics") or {}
        self.bad_evals = int(best.get("bad_evals") or 0)
        self.stopped_early = bool(best.get("stopped_early"))
        last = extra.get("last") or {}
        self.train_loss, self.val = last.get("train_loss"), dict(last.get("val") or {})
        if extra.get("rows_per_step") != self.rows_per_step and self.dist.is_main:
            log.warning(
                "resuming with %s rows per step (checkpoint used %s): the data order after step %d "
                "differs from an uninterrupted run", self.rows_per_step, extra.get("rows_per_step"), self.step,
            )
        if self.dist.is_main:
            log.info("resumed from %s at step %d", restored.path, self.step)
        return restored.path

    # --- the loop ------------------------------------------------------------------------------

    def _emit(self, metrics: dict[str, float | None]) -> None:
        if self.on_metrics is not None and self.dist.is_main:
            self.on_metrics(self.step, metrics)

    def _mfu(self, tokens_per_s: float) -> float | None:
        peak, name = peak_flops(self.device)
        if peak is None or self.flops_per_token is None:
            if not self._mfu_note_done and self.dist.is_main:
                log.warning("MFU not reported: no peak FLOP/s known for device %r (see trainer.PEAK_FLOPS)", name)
            self._mfu_note_done = True
            return None
        return self.flops_per_token * tokens_per_s / (peak * self.dist.world_size)

    def _check_run_dir(self) -> None:
        """Stop when the checkpoint directory was deleted under the run: going on would write a
        curve and checkpoints that no later run could trust."""
        if self._run_marker is not None and not self._run_marker.is_file():
            raise LmforgeError(
                f"{self._run_marker.parent} was deleted while training (before step {self.step + 1}); its "
                "checkpoints and curve are gone, so this run stops here. Rerun the stage to start from step 0 "
                f"(remove what is left first: rm -rf {self._run_marker.parent})"
            )

    def fit(self) -> TrainResult:
        """Train to total_steps (resuming first when allowed), evaluating and checkpointing on schedule."""
        from tqdm.auto import tqdm

        self.model.train()
        self.maybe_resume()
        last_ckpt: Path | None = None
        bar = tqdm(
            total=self.total_steps, initial=self.step, disable=not (self.cfg.progress and self.dist.is_main),
            desc="train", dynamic_ncols=True,
        )
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        while self.step < self.total_steps and not self.stopped_early:
            self._check_run_dir()
            t0 = time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]
            train_loss, tokens = self.compute_gradients(self.train_micro_batches(self.data_position))
            if not math.isfinite(train_loss):  # all-reduced: every rank stops here together
                raise LmforgeError(
                    f"the training loss is {train_loss} at step {self.step + 1}: stopped before the weights are "
                    "spoiled (nothing exported); lower lr, raise warmup_steps or grad_clip, or use precision fp32"
                )
            self.train_loss = train_loss
            grad_norm = self.optimizer_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            self.step += 1
            self.data_position += self.rows_per_step
            tokens_per_s = tokens / dt
            metrics: dict[str, float | None] = {
                "loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                "mfu": self._mfu(tokens_per_s), "peak_mem_mib": peak_memory_mib(self.device),
                "epoch": self.data_position / len(self.train_data),
            }
            last = self.step == self.total_steps
            if self.val_data is not None and (last or (self.cfg.eval_every and self.step % self.cfg.eval_every == 0)):
                val = self.val = self.evaluate()
                metrics.update(val)
                self._track_best(val)
                last = last or self.stopped_early
            self._emit(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", refresh=False)
            if last or (self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0):
                last_ckpt = self.save_checkpoint() or last_ckpt
        bar.close()
        if self.stopped_early and self.dist.is_main:
            log.info("early stop at step %d: %s did not improve for %d evals (best %.4g at step %s)",
                     self.step, self.cfg.best_metric, self.bad_evals, self.best_value or float("nan"), self.best_step)
        if self.cfg.best_metric is not None:
            self.restore_best()
        return TrainResult(
            step=self.step, train_loss=self.train_loss, val_loss=self.val.get("val_loss"),
            val_ppl=self.val.get("val_ppl"), tokens_seen=self.data_position * self.seq_len, checkpoint=last_ckpt,
            val_metrics=dict(self.val),
            best_step=self.best_step, best_metrics=dict(self.best_metrics), stopped_early=self.stopped_early,
        )
