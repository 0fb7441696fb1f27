"""Fine-tuning methods: `full` (every weight), `frozen` (classify only: the backbone frozen, the head
trained), `lora` (peft's LoraConfig on the backbone's Linear layers named in `target_modules`; the
classify head is trained fully through `modules_to_save`). LoRA adapters are merged
(`merge_and_unload`) into a plain model for export.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from lmforge.core.errors import LmforgeError


def linear_names(module: nn.Module) -> list[str]:
    """The distinct last name segments of the nn.Linear layers in `module` (LoRA's targets)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear) and name})


def apply_method(model: nn.Module, method: str, task: str, lora: Any = None) -> nn.Module:
    """Freeze / wrap for the method; returns the module to train (a peft PeftModel for lora).

    `lora`: an object with r, alpha, dropout, target_modules (lmforge.core.params.LoraParams)."""
    if method == "full":
        return model
    if method == "frozen":
        if task != "classify":
            raise LmforgeError("finetune.method 'frozen' trains only a classification head: use 'lora' or 'full' for sft")
        model.backbone.requires_grad_(False)
        return model
    if method != "lora":
        raise LmforgeError(f"finetune.method {method!r} is not one of full, frozen, lora")
    from peft import LoraConfig, get_peft_model

    backbone = model.backbone if task == "classify" else model
    available = linear_names(backbone)
    missing = [t for t in lora.target_modules if t not in available]
    if missing:
        raise LmforgeError(
            f"finetune.lora.target_modules {missing} are not Linear layers of the model: choose from {available}"
        )
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        modules_to_save=["head"] if task == "classify" else None,
    )
    return get_peft_model(model, config)


def is_peft(model: nn.Module) -> bool:
    # A PeftModel exists only once apply_method has imported peft: for full and frozen, importing
    # peft (and transformers with it, seconds) just to answer no would be the stage's slowest import.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def merged_model(model: nn.Module) -> nn.Module:
    """A plain module: LoRA adapters merged into the base weights (in place) and peft unwrapped."""
    return model.merge_and_unload() if is_peft(model) else model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, shared tensors counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)
