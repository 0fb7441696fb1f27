"""Finished models on disk, both kinds: pretrained (safetensors + config.json, and a Hugging Face
LlamaForCausalLM export) and fine-tuned (the same + task metadata, adapter). Written from full state
dicts to a temp dir and renamed into place, byte-identical for the same weights; none needs pickles to
load. Gathering a sharded model's tensors first is lmforge.train.export's job.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from lmforge.core.io import sweep_stale_temps, temp_name
from lmforge.core.errors import LmforgeError, naming_full_disk
from lmforge.model.decoder import ModelConfig, Transformer, build_model
from lmforge.model.files import ADAPTER_DIR, CONFIG, META_KEYS, TOKENIZER, WEIGHTS



def write_atomically(out_dir: Path, fill: Any) -> Path:
    """Call fill(tmp_dir), then replace out_dir with it in one rename."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(out_dir.parent)  # full model copies left by killed exports
    tmp = Path(tempfile.mkdtemp(prefix=f"{temp_name(out_dir).name}-", dir=out_dir.parent))
    try:
        with naming_full_disk(out_dir):  # safetensors does not say which file
            fill(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Deterministic bytes for the same tensors (DVC hashes them): safetensors writes its metadata
    map in hash order, so it holds one key only; everything else about a model is in config.json."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_pretrained(sd: dict[str, torch.Tensor], config: ModelConfig, out_dir: str | Path,
                     tokenizer_path: str | Path | None = None) -> Path:
    """model.safetensors + config.json (+ tokenizer.json) from a full state dict with clean names."""
    if config.tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != "output.weight"}  # embed.weight's alias; safetensors refuses it

    def fill(tmp: Path) -> None:
        save_safetensors(sd, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config.to_dict(), indent=2))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER)

    return write_atomically(Path(out_dir), fill)


def load_pretrained(model_dir: str | Path, device: str | torch.device = "cpu",
                    random_init: bool = False) -> tuple[Transformer, ModelConfig]:
    """Rebuild the model from save_pretrained's output (safetensors only, no pickles).

    `random_init`: the same architecture with fresh weights, the weights file not read (evaluate's
    from-scratch baseline). It draws from torch's generator exactly as a load does, so what is
    initialised after it (a classification head) gets the same values either way."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    for name in (CONFIG,) if random_init else (WEIGHTS, CONFIG):
        if not (model_dir / name).is_file():
            raise LmforgeError(f"{model_dir / name} is missing: point at a directory written by save_pretrained")
    config = ModelConfig.from_dict(json.loads((model_dir / CONFIG).read_text()))
    model = Transformer(config)
    if random_init:
        return model.to(device), config
    try:
        sd = load_file(str(model_dir / WEIGHTS), device=str(device))
    except Exception as exc:
        raise LmforgeError(f"{model_dir / WEIGHTS} is not a readable safetensors file ({exc}): re-export it") from None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed_missing = {"output.weight"} if config.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise LmforgeError(
            f"{model_dir / WEIGHTS} does not match {CONFIG}: missing {sorted(set(missing) - allowed_missing)}, "
            f"unexpected {sorted(unexpected)}; re-export the model"
        )
    return model.to(device), config


def hf_state_dict(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our names -> LlamaForCausalLM names. Rotary is already rotate_half, so q/k need no permutation."""
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    parts = {
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn.q_proj.weight": "self_attn.q_proj.weight",
        "attn.k_proj.weight": "self_attn.k_proj.weight",
        "attn.v_proj.weight": "self_attn.v_proj.weight",
        "attn.o_proj.weight": "self_attn.o_proj.weight",
        "ffn.gate_proj.weight": "mlp.gate_proj.weight",
        "ffn.up_proj.weight": "mlp.up_proj.weight",
        "ffn.down_proj.weight": "mlp.down_proj.weight",
    }
    for i in range(config.n_layers):
        for ours, theirs in parts.items():
            out[f"model.layers.{i}.{theirs}"] = sd[f"layers.{i}.{ours}"]
    return out


def hf_config(config: ModelConfig, bos_id: int | None = None, eos_id: int | None = None) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_embeddings,
        # transformers < 5 reads rope_theta, >= 5 reads rope_parameters; both are written.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def write_hf_llama(sd: dict[str, torch.Tensor], config: ModelConfig, out_dir: str | Path,
                   tokenizer_path: str | Path | None = None, bos_id: int | None = None,
                   eos_id: int | None = None) -> Path:
    """A directory that `transformers.LlamaForCausalLM.from_pretrained` loads as is."""
    hf = hf_state_dict(sd, config)

    def fill(tmp: Path) -> None:
        save_safetensors(hf, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(hf_config(config, bos_id, eos_id), indent=2))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER)

    return write_atomically(Path(out_dir), fill)


# --- fine-tuned models ----------------------------------------------------------------------------


def check_meta(meta: dict[str, Any]) -> None:
    unknown = set(meta) - set(META_KEYS)
    if unknown:
        raise LmforgeError(f"unknown fine-tuning metadata {sorted(unknown)}: allowed are {list(META_KEYS)}")


def write_finetuned(sd: dict[str, torch.Tensor], base_config: ModelConfig, out_dir: str | Path, meta: dict[str, Any],
                    tokenizer_path: str | Path | None = None, adapter_dir: str | Path | None = None) -> Path:
    """model.safetensors + config.json (ModelConfig fields + META_KEYS) + tokenizer.json (+ adapter/
    copied from `adapter_dir`) from a full state dict of the plain (merged) model."""
    check_meta(meta)
    if base_config.tie_embeddings:  # the same tensor as the embedding; safetensors refuses aliases
        tied = "backbone.output.weight" if meta["task"] == "classify" else "output.weight"
        sd = {k: v for k, v in sd.items() if k != tied}

    def fill(tmp: Path) -> None:
        save_safetensors(sd, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps({**base_config.to_dict(), **meta}, indent=2))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        if adapter_dir is not None:
            shutil.copytree(adapter_dir, tmp / ADAPTER_DIR)

    return write_atomically(Path(out_dir), fill)


def read_finetuned(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig, dict]:
    """(model, base config, task metadata) from save_finetuned's output (no pickles); the inference
    wrapper around them is lmforge.finetune.inference.load_finetuned."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not (model_dir / name).is_file():
            raise LmforgeError(f"{model_dir / name} is missing: point at a directory written by the finetune stage")
    raw = json.loads((model_dir / CONFIG).read_text())
    known = {f.name for f in fields(ModelConfig)}
    meta = {k: v for k, v in raw.items() if k not in known}
    if "task" not in meta:
        raise LmforgeError(f"{model_dir / CONFIG} has no 'task': it is not a fine-tuned model (use load_pretrained)")
    config = ModelConfig.from_dict({k: v for k, v in raw.items() if k in known})
    model = build_model(Transformer(config), meta["task"], len(meta.get("labels") or []), meta.get("pooling", "last"))
    try:
        sd = load_file(str(model_dir / WEIGHTS), device=str(device))
    except Exception as exc:
        raise LmforgeError(f"{model_dir / WEIGHTS} is not a readable safetensors file ({exc}): re-export it") from None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {"backbone.output.weight", "output.weight"} if config.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise LmforgeError(
            f"{model_dir / WEIGHTS} does not match {CONFIG}: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}; re-export the model"
        )
    return model.to(device), config, meta
