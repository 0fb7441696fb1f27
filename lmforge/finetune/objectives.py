"""Fine-tuning objectives: what the one trainer minimizes and measures for each task.

`classify`: cross-entropy over the head's logits (optionally class-weighted n / (n_labels * count), and
label-smoothed), accuracy at eval. `sft`: the language-model loss on the response and EOS tokens
(examples' targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.core.errors import LmforgeError
from lmforge.model.loss import lm_loss
from lmforge.train.batches import Batch, Collate
from lmforge.train.validation import EvalFn, LossFn
from lmforge.finetune.examples import classify_collate, sft_collate


def classify_loss(class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> LossFn:
    """(summed CE over the batch's examples, number of examples); weighted: (sum w*CE, sum w).
    `label_smoothing` e: the target puts 1 - e on the label and e spread over every class."""

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], lengths=batch["lengths"]).float()
        labels = batch["labels"]
        losses = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
        if class_weights is None:
            return losses.sum(), torch.tensor(labels.numel(), device=labels.device)
        w = class_weights.to(logits.device)[labels]
        return (losses * w).sum(), w.sum()

    return loss_fn


def classify_eval(model: nn.Module, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    logits = model(input_ids=batch["input_ids"], lengths=batch["lengths"])
    correct = (logits.argmax(-1) == batch["labels"]).sum()
    return {"val_accuracy": (correct, torch.tensor(batch["labels"].numel()))}


def balanced_class_weights(label_ids: Sequence[int], n_labels: int) -> torch.Tensor:
    counts = np.bincount(np.asarray(label_ids, dtype=np.int64), minlength=n_labels).astype(np.float64)
    return torch.tensor(len(label_ids) / (n_labels * np.maximum(counts, 1.0)), dtype=torch.float32)


@dataclass
class TaskSpec:
    """What the trainer needs for one task: the batch builder, the objective, the extra val metrics."""

    collate: Collate
    loss_fn: LossFn
    eval_fn: EvalFn | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def task_spec(task: str, pad_id: int, class_weights: torch.Tensor | None = None,
              label_smoothing: float = 0.0) -> TaskSpec:
    if task == "classify":
        return TaskSpec(classify_collate(pad_id), classify_loss(class_weights, label_smoothing), classify_eval)
    if task == "sft":
        return TaskSpec(sft_collate(pad_id), lm_loss)
    raise LmforgeError(f"finetune.task {task!r} is not one of classify, sft")
