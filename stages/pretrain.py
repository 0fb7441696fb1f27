"""DVC stage `pretrain`: train the decoder on data/shards with the one trainer, then export
models/pretrain (safetensors), models/pretrain_hf (LlamaForCausalLM) and reports/pretrain.

One process: `python -m stages.pretrain`. Many: `torchrun --nproc_per_node=N -m stages.pretrain`
(FSDP2 per block; rank 0 alone logs to MLflow and writes reports).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import torch

from lmforge.core import paths
from lmforge.core.stage import run_stage
from lmforge.core.io import write_json
from lmforge.data.tokens.shards import ShardReader
from lmforge.model.export import load_pretrained
from lmforge.train.export import export_hf_llama, save_pretrained
from lmforge.train.curves import CurveLog, plot_loss, unigram_entropy, write_csv
from lmforge.model.decoder import Transformer, build_config
from lmforge.train.distributed import apply_activation_checkpointing, apply_compile, apply_fsdp, init_distributed
from lmforge.core.params import Params, load_params
from lmforge.train.resume import result_knobs
from lmforge.train.batches import DocumentCollate, PackedRows, lm_collate
from lmforge.model.loss import lm_loss
from lmforge.train.trainer import Trainer
from lmforge.track.training import model_signature, register, training_run

log = logging.getLogger("stages.pretrain")

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REPORTS = paths.PRETRAIN_REPORTS
# The figures `dvc metrics show` and `dvc exp show` put side by side (metrics.json); stats.json
# keeps the rest (the model's size, the world size, the loss against the unigram entropy).
COMPARED = ("steps", "train_loss", "val_loss", "val_perplexity", "unigram_entropy", "tokens_per_s", "tokens_seen")


def run_fingerprint(params: Params, manifest: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: model shape, every knob of the result, the data."""
    return {
        "model": params.model.model_dump(mode="json"),
        "pretrain": result_knobs(params.pretrain),
        "tokenizer_sha256": manifest["tokenizer_sha256"],
        "train_shards": [s["sha256"] for s in manifest["splits"]["train"]["shards"]],
    }


def write_reports(curve: CurveLog, final_step: int, summary: dict[str, Any]) -> None:
    records = curve.read(up_to_step=final_step)
    # One row per step, val columns nan between evals: `dvc plots` draws both losses from it.
    write_csv(REPORTS / "curve.csv", records,
              ["step", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "val_ppl"], blank_missing=True)
    plot_loss(REPORTS / "loss.png", records, summary["unigram_entropy"], "pretrain")
    write_json(REPORTS / "stats.json", summary)
    write_json(REPORTS / "metrics.json", {key: summary[key] for key in COMPARED if summary[key] is not None})


def main() -> None:
    params = load_params()
    info = init_distributed()
    torch.manual_seed(params.pretrain.seed)
    eos = params.tokenizer.eos_token
    train = ShardReader(paths.SHARDS, "train", tokenizer_path=paths.TOKENIZER, eos_token=eos)
    val = ShardReader(paths.SHARDS, "val", tokenizer_path=paths.TOKENIZER, eos_token=eos)
    config = build_config(
        params.model.preset, vocab_size=train.vocab_size, max_seq_len=train.seq_len, **params.model.overrides()
    )
    model = Transformer(config).to(info.device)
    if params.runtime.pretrain.activation_checkpointing:
        apply_activation_checkpointing(model)
    if params.runtime.pretrain.compile:
        apply_compile(model)
    if info.distributed:
        compute_dtype = PRECISION_DTYPES[params.pretrain.precision]
        apply_fsdp(model, param_dtype=compute_dtype if info.device.type == "cuda" else torch.float32)

    # MLflow shows the resolved shape (dim 256, not the params' null = "the preset's").
    sections = {"model": {"preset": params.model.preset, **config.to_dict()}, "pretrain": params.pretrain}
    with training_run("pretrain", info, paths.PRETRAIN_CHECKPOINTS, run_fingerprint(params, train.manifest),
                      params.runtime.pretrain.resume, sections, [paths.SHARDS, paths.TOKENIZER]) as tr:
        runtime = params.runtime.pretrain
        collate = DocumentCollate(train.eos_id) if params.pretrain.document_mask else lm_collate
        trainer = Trainer(model, params.trainer("pretrain"), PackedRows(train, val, collate), dist_info=info,
                          checkpoint_dir=paths.PRETRAIN_CHECKPOINTS, on_metrics=tr.on_metrics,
                          loss_fn=functools.partial(lm_loss, loss_chunk=runtime.loss_chunk_tokens),
                          async_checkpoint=runtime.async_checkpoint)
        result = trainer.fit()
        save_pretrained(model, config, paths.PRETRAINED, tokenizer_path=paths.TOKENIZER)  # collective
        export_hf_llama(model, config, paths.PRETRAINED_HF, tokenizer_path=paths.TOKENIZER, eos_id=train.eos_id)
        if tr.run is None:  # not rank 0
            return
        plain, _ = load_pretrained(paths.PRETRAINED)
        baseline = unigram_entropy(train.blocks(), train.vocab_size)
        records = tr.curve.read(up_to_step=result.step)
        speeds = [r["tokens_per_s"] for r in records[len(records) // 5:] if "tokens_per_s" in r]
        summary = {
            "steps": result.step,
            "train_loss": result.train_loss,
            "val_loss": result.val_loss,
            "val_perplexity": result.val_ppl,
            "unigram_entropy": baseline,
            "val_loss_vs_unigram": (result.val_loss / baseline) if result.val_loss else None,
            "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
            "tokens_seen": result.tokens_seen,
            "parameters": config.num_params(),
            "world_size": info.world_size,
        }
        write_reports(tr.curve, result.step, summary)
        # The losses are already in the per-step history; the rest lands at the final step.
        final = ("val_perplexity", "unigram_entropy", "val_loss_vs_unigram", "tokens_per_s")
        tr.run.log_metrics({k: summary[k] for k in final if summary[k] is not None}, step=result.step)
        tr.run.set_tags({f"lmforge.{k}": summary[k] for k in ("steps", "tokens_seen", "parameters", "world_size")})
        figures = f"val loss {summary['val_loss']:.3f} nats/token (perplexity {summary['val_perplexity']:.1f})" \
            if result.val_loss is not None else "no validation"
        tr.run.describe(f"Pretrain `{params.model.preset}` ({config.num_params() / 1e6:.2f} M parameters) for "
                        f"{result.step} steps, {result.tokens_seen:,} tokens: {figures} against a unigram entropy "
                        f"of {baseline:.3f}. Curves: reports/pretrain/; samples: evaluate's reports/samples.json.")
        for name in ("stats.json", "loss.png", "curve.csv"):
            tr.run.log_artifact(REPORTS / name, "reports")
        tr.run.log_artifact(paths.PRETRAINED / "config.json", "model_config")
        register(tr.run, plain, paths.PRETRAINED_MODEL, paths.PRETRAINED / "model.safetensors",
                 description="lmforge's pretrained decoder (Llama-style): token ids (batch, time) -> next-token "
                             "logits (batch, time, vocab). Tokenizer: tokenizer.json beside the weights.",
                 figures={"val_loss": result.val_loss, "val_perplexity": result.val_ppl},
                 signature=model_signature({"input_ids": ("int64", (-1, -1))},
                                           {"logits": ("float32", (-1, -1, config.vocab_size))}),
                 input_example=np.full((1, 8), train.eos_id, dtype=np.int64))
        log.info("val loss %.3f (unigram entropy %.3f)", result.val_loss or float("nan"), baseline)


if __name__ == "__main__":
    run_stage("pretrain", main)
