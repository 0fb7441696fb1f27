"""Exporting a model that may be sharded: gather its full tensors (a collective under FSDP: every
rank calls), let rank 0 write them with lmforge.model.export's writers, and wait for it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.model.decoder import ModelConfig
from lmforge.model.export import check_meta, write_finetuned, write_hf_llama, write_pretrained
from lmforge.train.distributed import barrier, clean_name


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU tensors with clean names (collective under FSDP; every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {clean_name(k): v for k, v in sd.items()}


def is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _gathered(model: nn.Module, write: Callable[[dict[str, torch.Tensor]], Path], out_dir: str | Path) -> Path:
    """Gather on every rank (only rank 0 receives the tensors: cpu_offload), write on rank 0, barrier."""
    sd = full_state_dict(model)
    if is_main():
        write(sd)
    barrier()
    return Path(out_dir)


def save_pretrained(model: nn.Module, config: ModelConfig, out_dir: str | Path,
                    tokenizer_path: str | Path | None = None) -> Path:
    """model.safetensors + config.json (+ tokenizer.json); collective under FSDP, rank 0 writes."""
    return _gathered(model, lambda sd: write_pretrained(sd, config, out_dir, tokenizer_path), out_dir)


def export_hf_llama(model: nn.Module, config: ModelConfig, out_dir: str | Path,
                    tokenizer_path: str | Path | None = None, bos_id: int | None = None,
                    eos_id: int | None = None) -> Path:
    """A directory `transformers.LlamaForCausalLM.from_pretrained` loads as is; collective, rank 0 writes."""
    return _gathered(model, lambda sd: write_hf_llama(sd, config, out_dir, tokenizer_path, bos_id, eos_id), out_dir)


def save_finetuned(model: nn.Module, base_config: ModelConfig, out_dir: str | Path, meta: dict[str, Any],
                   tokenizer_path: str | Path | None = None, adapter_dir: str | Path | None = None) -> Path:
    """The fine-tuned model (plain or merged, possibly sharded); collective under FSDP, rank 0 writes."""
    check_meta(meta)  # on every rank, before the collective
    return _gathered(model, lambda sd: write_finetuned(sd, base_config, out_dir, meta, tokenizer_path, adapter_dir),
                     out_dir)
