"""The one loss-over-batches loop: a model's summed loss, counted tokens and extra metrics over
batches, in eval mode and without gradients. The trainer's validation (then summed over ranks) and
evaluate's loss over the val shards both use it, so their losses and perplexities agree.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lmforge.train.batches import Batch

# (model, batch) -> (summed loss over counted tokens, number of counted tokens)
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, int | torch.Tensor]]
# (model, batch) -> {metric name: (summed numerator, denominator)}; summed over val batches and ranks,
# the metric is numerator / denominator (e.g. {"val_accuracy": (correct, examples)}).
EvalFn = Callable[[nn.Module, Batch], dict[str, tuple[torch.Tensor | float, torch.Tensor | float]]]


def perplexity(loss: float) -> float:
    """exp(loss), or inf where that overflows (an untrained or diverged model): never a made-up cap."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


@torch.no_grad()
def summed_loss(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn, device: torch.device,
                eval_fn: EvalFn | None = None,
                autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                ) -> tuple[list[torch.Tensor], list[str]]:
    """([summed loss, counted tokens, then each eval_fn metric's numerator and denominator], the
    metrics' names, sorted): float64 on `device`, divided once by the caller, so the mean does not
    depend on the batch size. The model comes back in the mode it was given."""
    was_training = model.training
    model.eval()
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    extra: dict[str, list[torch.Tensor]] = {}
    try:
        for batch in batches:
            with autocast():
                loss_sum, n_tokens = loss_fn(model, batch)
                parts = eval_fn(model, batch) if eval_fn is not None else {}
            loss_total += loss_sum.double()
            tokens += torch.as_tensor(n_tokens, device=device).double()
            for name, (num, den) in parts.items():
                acc = extra.setdefault(name, [torch.zeros((), dtype=torch.float64, device=device)] * 2)
                extra[name] = [acc[0] + torch.as_tensor(num, device=device).double(),
                               acc[1] + torch.as_tensor(den, device=device).double()]
    finally:
        model.train(was_training)
    names = sorted(extra)
    return [loss_total, tokens] + [value for name in names for value in extra[name]], names
