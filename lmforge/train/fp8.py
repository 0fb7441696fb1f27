"""FP8 training (`pretrain.precision: fp8`) with torchao's float8: the check that this GPU can, which
Linear layers compute in float8, the swap applied from outside the model, and the weight scales
precomputed after each optimizer step.

What computes in float8 are the blocks' projections (attention q/k/v/o, the MLP's gate/up/down):
nearly all the FLOPs. The embeddings, norms and the output head stay in bf16 autocast, as torchao's
and torchtitan's recipes leave them (the head's logits are the most sensitive matmul, and tied
embeddings share its weight). Master weights and the optimizer stay fp32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmforge.core.errors import LmforgeError
from lmforge.core.quiet import torchao_module
from lmforge.model.decoder import block_linear

# Float8 tensor-core matmuls (torch._scaled_mm) exist from Ada (sm_89: L4, RTX 4090) and Hopper (H100) on.
MIN_CAPABILITY = (8, 9)
RECIPES = ("tensorwise", "rowwise")
# cuBLAS's and CUTLASS's float8 kernels need both matmul dims divisible by 16.
DIM_MULTIPLE = 16


def refusal(key: str, capability: tuple[int, int] | None) -> str | None:
    """Why fp8 cannot train on a GPU of `capability` (None: torch sees no GPU); None when it can."""
    need = f"a CUDA GPU of compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (H100, L4, RTX 4090 or newer)"
    if capability is None:
        return f"{key}: fp8 needs {need}, and torch sees no GPU here: use {key}: bf16"
    if tuple(capability) < MIN_CAPABILITY:
        return (f"{key}: fp8 needs {need}; this GPU has {capability[0]}.{capability[1]}: "
                f"use {key}: bf16")
    return None


def check_supported(key: str = "pretrain.precision", device_index: int = 0) -> None:
    """Raise LmforgeError, before any work, unless the GPU this process will use can train in fp8."""
    capability = None
    if torch.cuda.is_available():
        index = device_index if device_index < torch.cuda.device_count() else 0
        capability = torch.cuda.get_device_capability(index)
    reason = refusal(key, capability)
    if reason is not None:
        raise LmforgeError(reason)


@dataclass(frozen=True)
class Selection:
    """The Linear layers of a model that compute in float8, and the block projections left in bf16
    because a dimension is not a multiple of DIM_MULTIPLE (by name)."""

    converted: tuple[str, ...]
    skipped: tuple[str, ...]


def select(model: nn.Module) -> Selection:
    """The blocks' Linear layers whose dims are multiples of DIM_MULTIPLE; never the head or the embeddings."""
    converted, skipped = [], []
    for fqn, module in model.named_modules():
        if not block_linear(module, fqn):
            continue
        out_features, in_features = module.weight.shape
        fits = out_features % DIM_MULTIPLE == 0 and in_features % DIM_MULTIPLE == 0
        (converted if fits else skipped).append(fqn)
    return Selection(tuple(converted), tuple(skipped))


def float8_all_gather(precision: str, recipe: str, fsdp: bool) -> bool:
    """Whether FSDP2 gathers the float8 layers' weights in float8: torchao offers it for tensorwise only."""
    return precision == "fp8" and recipe == "tensorwise" and fsdp


def float8_config(recipe: str, *, fsdp: bool, emulate: bool = False) -> Any:
    """torchao's Float8LinearConfig for `recipe`. Under FSDP2 with tensorwise scaling the weights are
    all-gathered in float8 (half the bytes of bf16): torchao offers that for tensorwise only.
    `emulate`: torchao computes the float8 matmuls in high precision (casts and scales are real), so
    CPU tests run the same path; never set by the stage."""
    if recipe not in RECIPES:
        raise LmforgeError(f"pretrain.fp8_recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    config = torchao_module("torchao.float8", "pretrain.precision fp8").Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, enable_fsdp_float8_all_gather=float8_all_gather("fp8", recipe, fsdp),
                               emulate=emulate)


def convert(model: nn.Module, recipe: str, *, fsdp: bool, emulate: bool = False) -> Selection:
    """Swap the selected Linear layers of `model` for torchao's Float8Linear, in place (same
    parameter names, so checkpoints and exports are unchanged). Apply before tensor parallelism,
    activation checkpointing, compile and FSDP2, as torchtitan does."""
    config = float8_config(recipe, fsdp=fsdp, emulate=emulate)
    from torchao.float8 import convert_to_float8_training

    selection = select(model)
    chosen = frozenset(selection.converted)
    convert_to_float8_training(model, module_filter_fn=lambda _module, fqn: fqn in chosen, config=config)
    if recipe == "rowwise":
        # What torchtitan sets for rowwise, its short-term workaround for pytorch/pytorch#150859
        # (inductor's handling of precision casts under compile); a process-wide inductor setting.
        import torch._inductor.config

        torch._inductor.config.emulate_precision_casts = True
    return selection


def describe(selection: Selection) -> str:
    """One log line: how many layers compute in float8 and which stayed in bf16."""
    line = f"fp8: {len(selection.converted)} linear layers in float8"
    if selection.skipped:
        line += (f"; {len(selection.skipped)} left in bf16 (a dimension not a multiple of {DIM_MULTIPLE}): "
                 f"{', '.join(selection.skipped)}")
    return line


def after_optimizer_step(model: nn.Module) -> None:
    """Under FSDP2 with float8 all-gather, compute every float8 weight's scale in one all-reduce
    (instead of one per weight at the next all-gather); nothing to do for other layouts."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
