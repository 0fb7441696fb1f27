"""What the trainer steps with: AdamW (matrices decay, norms and biases do not), the learning-rate
schedule (linear warmup, then cosine decay to min_lr) and, for fp16, the gradient scaler.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.core.params import TrainerParams
from lmforge.train.distributed import DistInfo


def lr_at(step: int, cfg: TrainerParams, total_steps: int) -> float:
    """Multiplier of cfg.lr after `step` optimizer steps: linear warmup, then cosine to min_lr."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainerParams, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # Matrices (and embeddings) decay; norms and biases do not.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **extra)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerParams,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg, total_steps))


def build_scaler(cfg: TrainerParams, dist: DistInfo, device: torch.device) -> torch.amp.GradScaler | None:
    if cfg.precision != "fp16":
        return None
    if dist.distributed:
        # All-reduces found-inf across ranks, so every rank skips the same steps.
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)
