"""The one training loop (pretraining and fine-tuning): precision, accumulation, LR schedule, eval,
metrics, checkpoints and exact resume; early stopping is a pluggable piece of state (lmforge.train.early_stopping).

Two kinds of data, named: `PackedRows` (pretraining: rows of seq_len + 1 token ids) and `Examples`
(fine-tuning: anything its `collate` batches, at most `max_tokens` tokens each). The objective
(`loss_fn`), extra validation metrics (`eval_fn`) and the metrics sink (`on_metrics`) are pluggable.
The knobs are the typed params (lmforge.core.params.TrainerParams): no second set of defaults here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.train.batches import Batch, Examples, PackedRows, Prefetcher, RowSampler, check_step_fits, tokens_per_row
from lmforge.train.checkpoint import CheckpointManager
from lmforge.train.early_stopping import EarlyStopping
from lmforge.core.errors import LmforgeError
from lmforge.model.loss import lm_loss
from lmforge.train.distributed import DistInfo, clip_grad_norm_, init_distributed
from lmforge.train import fp8
from lmforge.core.params import TrainerParams
from lmforge.train.resume import MARKER as RUN_MARKER, check_still_claimed, run_record
from lmforge.train.optim import build_optimizer, build_scaler, build_scheduler
from lmforge.train.throughput import mfu, peak_flops, peak_memory_mib
from lmforge.train.validation import EvalFn, LossFn, perplexity, summed_loss

log = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float | None]], None]

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


class Trainer:
    """Runs `config.max_steps` optimizer steps of `loss_fn` over `data.train`, resuming from checkpoints.

    `model` is already on `dist_info.device` and already parallelized (apply_fsdp etc.), or plain.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainerParams,
        data: PackedRows | Examples,
        *,
        dist_info: DistInfo | None = None,
        checkpoint_dir: str | Path | None = None,
        loss_fn: LossFn = lm_loss,
        on_metrics: MetricsCallback | None = None,
        flops_per_token: float | None = None,
        eval_fn: EvalFn | None = None,
        early_stopping: EarlyStopping | None = None,
        prefetch: bool = True,
        async_checkpoint: bool = False,
    ) -> None:
        """`prefetch`: build the next step's micro-batches in a background thread (same batches,
        same order); `async_checkpoint`: write checkpoints in the background (CheckpointManager)."""
        self.model, self.cfg, self.data = model, config, data
        self.dist = dist_info or init_distributed()
        self.device = self.dist.device
        self.train_data, self.val_data, self.collate = data.train, data.val, data.collate
        self.loss_fn, self.on_metrics, self.eval_fn = loss_fn, on_metrics, eval_fn
        self.early_stopping = early_stopping
        self._check_setup(checkpoint_dir)
        self.seq_len = tokens_per_row(data, model)
        # The processes of one tensor-parallel group read the same rows: data splits over dp_size.
        self.rows_per_step = config.micro_batch_size * config.grad_accum_steps * self.dist.dp_size
        check_step_fits(len(self.train_data), config, self.dist.dp_size)
        self.total_steps = config.max_steps
        if config.max_tokens is not None:
            self.total_steps = min(self.total_steps, math.ceil(config.max_tokens / (self.rows_per_step * self.seq_len)))
        if flops_per_token is None and hasattr(model, "config"):
            flops_per_token = model.config.flops_per_token(self.seq_len)
        self.flops_per_token = flops_per_token
        self.sampler = RowSampler(len(self.train_data), config.seed)
        self.data_position = 0
        self.step = 0
        self.optimizer = build_optimizer(model, config, self.device)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.scaler = build_scaler(config, self.dist, self.device)
        owner = run_record(Path(checkpoint_dir)).get("nonce") if checkpoint_dir else None
        self.checkpoints = (
            CheckpointManager(checkpoint_dir, config.keep_checkpoints, owner, async_save=async_checkpoint)
            if checkpoint_dir else None
        )
        self.prefetch = prefetch
        if early_stopping is not None and checkpoint_dir:
            early_stopping.checkpoints = CheckpointManager(Path(checkpoint_dir) / "best", 1, owner)
        # The last step's figures, checkpointed: a run resumed after it finished reports them again.
        self.train_loss: float | None = None
        self.val: dict[str, float] = {}
        # The run directory's marker (lmforge.train.resume): if it vanishes mid-run, the directory was deleted.
        marker = Path(checkpoint_dir) / RUN_MARKER if checkpoint_dir else None
        self._run_marker = marker if marker is not None and marker.is_file() else None

    # --- setup (the knobs themselves were checked when the params loaded) ------------------------

    def _check_setup(self, checkpoint_dir: str | Path | None) -> None:
        if self.early_stopping is not None and self.val_data is None:
            raise LmforgeError(f"early stopping on {self.early_stopping.metric!r} needs validation data")
        if self.early_stopping is not None and self.dist.distributed and checkpoint_dir is None:
            raise LmforgeError("keeping the best weights across processes needs a checkpoint_dir (its best/ copy)")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        # fp8: the float8 layers (lmforge.train.fp8) cast their own matmuls; the rest computes in bf16.
        dtype = torch.float16 if self.cfg.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # --- data ----------------------------------------------------------------------------------

    def _to_device(self, batch: Batch) -> Batch:
        non_blocking = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=non_blocking) for k, v in batch.items()}

    def host_micro_batches(self, position: int) -> list[Batch]:
        """This rank's micro-batches (in host memory) of the optimizer step that starts at stream `position`."""
        b, w, r = self.cfg.micro_batch_size, self.dist.dp_size, self.dist.dp_rank
        out = []
        for m in range(self.cfg.grad_accum_steps):
            ids = self.sampler.rows(position + (m * w + r) * b, b)
            out.append(self.collate([self.train_data[i] for i in ids]))
        return out

    def train_micro_batches(self, position: int) -> Iterator[Batch]:
        """This rank's micro-batches of the optimizer step that starts at stream `position`, on the device."""
        for batch in self.host_micro_batches(position):
            yield self._to_device(batch)

    def val_micro_batches(self) -> Iterator[Batch]:
        """A fixed slice of the val rows (the first eval_batches global batches), disjoint across ranks."""
        assert self.val_data is not None
        b, w, r = self.cfg.micro_batch_size, self.dist.dp_size, self.dist.dp_rank
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

    def _grad_sync(self, enabled: bool) -> None:
        """FSDP2 reduces gradients only on the last micro-step of an accumulation."""
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(enabled)

    def _all_reduce_sum(self, values: list[float | torch.Tensor]) -> list[float]:
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(()) for v in values])
        if self.dist.distributed:  # over data-parallel ranks: a TP group's ranks hold the same sums
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dist.dp_group)
        return t.tolist()

    def compute_gradients(self, micro_batches: Sequence[Batch] | Iterator[Batch]) -> tuple[float, float]:
        """Accumulate into .grad the gradient of the mean loss over every counted token of every
        micro-batch on every rank; returns (mean loss, tokens counted over all ranks).

        Each micro-step backpropagates its summed loss / a fixed size hint (to keep fp16 in range);
        afterwards the grads are rescaled by hint * dp_size / total tokens, which is exact even
        when the token counts of micro-batches differ (fine-tuning with ignored targets).
        """
        self.optimizer.zero_grad(set_to_none=True)
        batches = list(micro_batches)
        hint = float(self.cfg.micro_batch_size * self.seq_len)
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens_local = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            for m, batch in enumerate(batches):
                self._grad_sync(m == len(batches) - 1)
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
        # FSDP averages grads over data-parallel ranks; undo that and divide by the global token count instead.
        factor = hint * self.dist.dp_size / tokens_all
        if factor != 1.0:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)
        return loss_sum_all / tokens_all, tokens_all

    def optimizer_step(self) -> float:
        """Clip, step the optimizer and the LR schedule; returns the pre-clip grad norm."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = clip_grad_norm_(self.model.parameters(), max_norm)  # DTensors on several meshes under TP
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.cfg.precision == "fp8":
            fp8.after_optimizer_step(self.model)  # the new weights' float8 scales, in one all-reduce
        self.scheduler.step()
        return float(norm)

    # --- eval ----------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Mean loss and perplexity over the fixed val batches (all ranks), plus eval_fn's metrics."""
        sums, names = summed_loss(self.model, self.val_micro_batches(), self.loss_fn, self.device, self.eval_fn,
                                  self.autocast)
        self.model.train()
        reduced = self._all_reduce_sum(sums)
        loss = reduced[0] / max(reduced[1], 1.0)
        out = {"val_loss": loss, "val_ppl": perplexity(loss)}
        for i, name in enumerate(names):
            out[name] = reduced[2 + 2 * i] / max(reduced[3 + 2 * i], 1e-12)
        return out

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
            "train_config": self.cfg.model_dump(mode="json"),
            "best": self.early_stopping.state_dict() if self.early_stopping is not None else None,
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
        if self.early_stopping is not None and extra.get("best"):
            self.early_stopping.load_state_dict(extra["best"])
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

    @property
    def stopped_early(self) -> bool:
        return self.early_stopping is not None and self.early_stopping.stopped

    def _save_best(self) -> None:
        assert self.early_stopping is not None and self.early_stopping.checkpoints is not None
        self.early_stopping.checkpoints.save(self.step, self.model, self.optimizer, self._extra_state())

    def _loop(self, bar: Any, prefetcher: Prefetcher | None) -> Path | None:
        last_ckpt: Path | None = None
        while self.step < self.total_steps and not self.stopped_early:
            check_still_claimed(self._run_marker, self.step + 1)
            t0 = time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]
            if prefetcher is None:
                micro_batches = self.train_micro_batches(self.data_position)
            else:
                ahead = self.data_position + self.rows_per_step if self.step + 1 < self.total_steps else None
                micro_batches = map(self._to_device, prefetcher.get(self.data_position, ahead))
            train_loss, tokens = self.compute_gradients(micro_batches)
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
                "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                "mfu": mfu(self.flops_per_token, tokens_per_s, self.device, self.dist.world_size), "peak_mem_mib": peak_memory_mib(self.device),
                "epoch": self.data_position / len(self.train_data),
            }
            last = self.step == self.total_steps
            if self.val_data is not None and (last or (self.cfg.eval_every and self.step % self.cfg.eval_every == 0)):
                val = self.val = self.evaluate()
                metrics.update(val)
                if self.dist.is_main:  # through tqdm (fit): a line above the progress bar, not inside it
                    log.info("step %d/%d: val_loss %.4f (train_loss %.4f)%s", self.step, self.total_steps, val["val_loss"],
                             train_loss, "".join(f", {k} {v:.4f}" for k, v in val.items() if k not in ("val_loss", "val_ppl")))
                if self.early_stopping is not None:
                    self.early_stopping.update(self.step, val, self.model, self._save_best, self.dist.distributed,
                                               self.device)
                last = last or self.stopped_early
            self._emit(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", refresh=False)
            if last or (self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0):
                last_ckpt = self.save_checkpoint() or last_ckpt
        return last_ckpt

    def fit(self) -> TrainResult:
        """Train to total_steps (resuming first when allowed), evaluating and checkpointing on schedule."""
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.model.train()
        self.maybe_resume()
        peak, device_name = peak_flops(self.device)
        if peak is None and self.device.type == "cuda" and self.dist.is_main:  # a CPU's is never known: no warning
            log.warning("MFU not reported: no peak FLOP/s known for %r (add it to throughput.PEAK_FLOPS)", device_name)
        shown = self.cfg.progress and self.dist.is_main and sys.stderr.isatty()  # a bar's redraws in a log are noise
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not shown, desc="train", dynamic_ncols=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        prefetcher = Prefetcher(self.host_micro_batches, pin=self.device.type == "cuda") if self.prefetch else None
        try:
            with logging_redirect_tqdm():  # a warning or a val line during training prints above the bar
                last_ckpt = self._loop(bar, prefetcher)
        finally:
            if prefetcher is not None:
                prefetcher.close()
            if self.checkpoints is not None:
                self.checkpoints.wait()  # a background write finishes (and commits) before fit returns
        bar.close()
        stopping = self.early_stopping
        if stopping is not None and stopping.stopped and self.dist.is_main:
            log.info("early stop at step %d: %s did not improve for %d evals (best %.4g at step %s)",
                     self.step, stopping.metric, stopping.bad_evals, stopping.best_value or float("nan"),
                     stopping.best_step)
        if stopping is not None:
            stopping.restore(self.model)
        return TrainResult(
            step=self.step, train_loss=self.train_loss, val_loss=self.val.get("val_loss"),
            val_ppl=self.val.get("val_ppl"), tokens_seen=self.data_position * self.seq_len, checkpoint=last_ckpt,
            val_metrics=dict(self.val), best_step=stopping.best_step if stopping else None,
            best_metrics=dict(stopping.best_metrics) if stopping else {}, stopped_early=self.stopped_early,
        )
