"""The language-modelling loss (`lm_loss`, the trainer's default objective), and cross-entropy over a
large vocabulary without the (tokens, vocab) logits: the output projection and the loss run a chunk
of tokens at a time, each chunk's logits recomputed in backward instead of kept, so at most one
chunk's logits exist at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` (hidden (..., dim), weight (vocab, dim)) against
    `targets` (...), IGNORE_INDEX skipped; equal to the plain loss up to float summation order."""
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_t.shape[0], chunk_tokens):
        h, t = flat_h[start : start + chunk_tokens], flat_t[start : start + chunk_tokens]
        total = total + checkpoint(_chunk_loss, h, weight, t, use_reentrant=False, preserve_rng_state=False)
    return total


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], loss_chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the count of targets that are not IGNORE_INDEX.

    A batch with `segments` (lmforge.train.batches.DocumentCollate) is document-masked; `loss_chunk` > 0
    computes the loss that many tokens at a time, never holding the whole logits tensor.
    """
    targets = batch["targets"]
    extra = {"segments": batch["segments"]} if "segments" in batch else {}
    if loss_chunk > 0:
        _, loss_sum = model(batch["inputs"], targets, loss_chunk=loss_chunk, **extra)
    else:
        logits = model(batch["inputs"], **extra)
        loss_sum = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
    return loss_sum, (targets != IGNORE_INDEX).sum()
