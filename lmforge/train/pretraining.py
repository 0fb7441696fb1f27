"""Pretraining the decoder on the token shards: the model as the params and the shards shape it
(tensor parallelism, activation checkpointing, compile, FSDP2 over many processes), the trainer over
packed rows, the fingerprint a resumed checkpoint must match, the bytes a step communicates, and the
report stages/pretrain.py writes and logs.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import numpy as np
import torch

from lmforge.core import paths
from lmforge.core.params import Params
from lmforge.data.tokens.shards import ShardReader
from lmforge.model.decoder import ModelConfig, Transformer, build_config
from lmforge.model.loss import lm_loss
from lmforge.train.batches import DocumentCollate, PackedRows, lm_collate
from lmforge.train.communication import DTYPE_BYTES, Layout, StepBytes
from lmforge.train.communication import step_bytes as communication_bytes
from lmforge.train import fp8
from lmforge.train.curves import unigram_entropy
from lmforge.train.distributed import DistInfo, parallelize
from lmforge.train.report import Registration, TrainingReport
from lmforge.train.resume import result_knobs
from lmforge.train.throughput import peak_flops
from lmforge.train.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)
# fp8: the float8 layers cast their own matmuls; FSDP2 gathers the other weights in bf16.
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
# The figures `dvc metrics show` and `dvc exp show` put side by side (metrics.json); stats.json
# keeps the rest (the model's size, the world size, the loss against the unigram entropy).
# Bytes one optimizer step sends per process (MLflow metrics of the run, stats.json).
COMM_METRICS = tuple(f"comm_bytes_{key}" for key in ("all_gather", "reduce_scatter", "tp_all_reduce", "total"))
COMPARED = ("steps", "train_loss", "val_loss", "val_perplexity", "unigram_entropy", "tokens_per_s", "tokens_seen")


def run_fingerprint(params: Params, manifest: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: model shape, every knob of the result, the data."""
    return {
        "model": params.model.model_dump(mode="json"),
        "pretrain": result_knobs(params.pretrain),
        "tokenizer_sha256": manifest["tokenizer_sha256"],
        "train_shards": [s["sha256"] for s in manifest["splits"]["train"]["shards"]],
    }


def build_decoder(params: Params, train: ShardReader, info: DistInfo) -> tuple[Transformer, ModelConfig]:
    """The preset's decoder sized to the shards' vocabulary and rows, on this process's device,
    laid out as the knobs ask (float8 layers for fp8, tensor parallelism, then FSDP2 per block when
    there are many processes)."""
    config = build_config(
        params.model.preset, vocab_size=train.vocab_size, max_seq_len=train.seq_len, **params.model.overrides()
    )
    model = Transformer(config).to(info.device)
    if params.pretrain.precision == "fp8":  # before the wrappers, as torchtitan converts (lmforge.train.fp8)
        selection = fp8.convert(model, params.pretrain.fp8_recipe, fsdp=info.distributed)
        if info.is_main:
            log.info(fp8.describe(selection))
    compute_dtype = PRECISION_DTYPES[params.pretrain.precision]
    parallelize(model, info, param_dtype=compute_dtype if info.device.type == "cuda" else torch.float32,
                reduce_dtype=PRECISION_DTYPES[params.pretrain.reduce_precision],
                activation_checkpointing=params.runtime.pretrain.activation_checkpointing,
                compile=params.runtime.pretrain.compile)
    return model, config


def check_precision(params: Params) -> None:
    """Before any work (the rendezvous included): fp8 needs a GPU that computes in float8 (each
    process checks the GPU torchrun gives it)."""
    if params.pretrain.precision == "fp8":
        fp8.check_supported("pretrain.precision", int(os.environ.get("LOCAL_RANK", "0")))


def build_trainer(model: Transformer, params: Params, train: ShardReader, val: ShardReader, info: DistInfo,
                  on_metrics: Any) -> Trainer:
    """The one trainer over packed rows (documents masked from each other when the knobs say so)."""
    collate = DocumentCollate(train.eos_id) if params.pretrain.document_mask else lm_collate
    runtime = params.runtime.pretrain
    return Trainer(model, params.trainer("pretrain"), PackedRows(train, val, collate), dist_info=info,
                   checkpoint_dir=paths.PRETRAIN_CHECKPOINTS, on_metrics=on_metrics,
                   loss_fn=functools.partial(lm_loss, loss_chunk=runtime.loss_chunk_tokens),
                   async_checkpoint=runtime.async_checkpoint)


def step_bytes(params: Params, info: DistInfo, config: ModelConfig, seq_len: int) -> StepBytes:
    """What one optimizer step sends per process at this layout (lmforge.train.communication)."""
    knobs = params.pretrain
    on_gpu = info.device.type == "cuda"  # CPU runs gather fp32 weights and compute in fp32 (build_decoder)
    layout = Layout(dp=info.dp_size if info.distributed else 1, tp=info.tensor_parallel,
                    micro_batch_size=knobs.micro_batch_size, seq_len=seq_len, grad_accum_steps=knobs.grad_accum_steps,
                    param_bytes=DTYPE_BYTES[knobs.precision] if on_gpu else 4,
                    # fp8 tensorwise under FSDP2 gathers the blocks' float8 projections in float8
                    projection_bytes=1 if on_gpu and fp8.float8_all_gather(knobs.precision, knobs.fp8_recipe,
                                                                            info.distributed) else None,
                    reduce_bytes=DTYPE_BYTES[knobs.reduce_precision],
                    activation_bytes=DTYPE_BYTES[knobs.precision] if on_gpu else 4)
    return communication_bytes(config, layout)


def summarize(result: TrainResult, records: list[dict[str, Any]], train: ShardReader, config: ModelConfig,
              info: DistInfo, comm: StepBytes | None = None) -> dict[str, Any]:
    """stats.json: the run's figures beside the unigram entropy of the train shards (the loss a
    model that ignores context reaches), throughput past the first fifth of the steps (warm-up),
    and `comm`, the bytes each step sends per process (step_bytes)."""
    baseline = unigram_entropy(train.blocks(), train.vocab_size)
    speeds = [r["tokens_per_s"] for r in records[len(records) // 5:] if "tokens_per_s" in r]
    mfus = [r["mfu"] for r in records[len(records) // 5:] if r.get("mfu") is not None]
    _, device = peak_flops(info.device)
    return {
        "steps": result.step,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "val_perplexity": result.val_ppl,
        "unigram_entropy": baseline,
        "val_loss_vs_unigram": (result.val_loss / baseline) if result.val_loss else None,
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        # Model FLOPs utilization needs the device's peak FLOP/s: never known for a CPU, so said here, once
        "mfu": sum(mfus) / len(mfus) if mfus else f"not known: no peak FLOP/s for {device} (throughput.PEAK_FLOPS)",
        "tokens_seen": result.tokens_seen,
        "parameters": config.num_params(),
        "world_size": info.world_size,
        "tensor_parallel": info.tensor_parallel,
        **{f"comm_bytes_{key}": value for key, value in (comm.as_dict() if comm else {}).items()},
    }


def report(preset: str, result: TrainResult, records: list[dict[str, Any]], summary: dict[str, Any],
           config: ModelConfig) -> TrainingReport:
    """The pretrain stage's report files, run figures, tags, description and artifacts."""
    reports = paths.PRETRAIN_REPORTS
    figures = f"val loss {summary['val_loss']:.3f} nats/token (perplexity {summary['val_perplexity']:.1f})" \
        if result.val_loss is not None else "no validation"
    description = (f"Pretrain `{preset}` ({config.num_params() / 1e6:.2f} M parameters) for {result.step} steps, "
                   f"{result.tokens_seen:,} tokens: {figures} against a unigram entropy of "
                   f"{summary['unigram_entropy']:.3f}. Curves: reports/pretrain/; samples: evaluate's reports/samples.json.")
    return TrainingReport(
        reports=reports, records=records, summary=summary, compared=COMPARED,
        columns=["step", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "val_ppl"],
        title="pretrain", baseline=summary["unigram_entropy"],
        final=("val_perplexity", "unigram_entropy", "val_loss_vs_unigram", "tokens_per_s", *COMM_METRICS),
        tagged=("steps", "tokens_seen", "parameters", "world_size", "tensor_parallel"), description=description,
        artifacts={"reports": [reports / name for name in ("stats.json", "loss.png", "curve.csv")],
                   "model_config": [paths.PRETRAINED / "config.json"]},
    )


def registration(result: TrainResult, config: ModelConfig, eos_id: int) -> Registration:
    """models/pretrain's card in the registry: token ids in, next-token logits out."""
    return Registration(
        loader="pretrained", name=paths.PRETRAINED_MODEL, weights=paths.PRETRAINED / "model.safetensors",
        description="lmforge's pretrained decoder (Llama-style): token ids (batch, time) -> next-token "
                    "logits (batch, time, vocab). Tokenizer: tokenizer.json beside the weights.",
        figures={"val_loss": result.val_loss, "val_perplexity": result.val_ppl},
        signature=({"input_ids": ("int64", (-1, -1))}, {"logits": ("float32", (-1, -1, config.vocab_size))}),
        input_example=(np.full((2, 8), eos_id, dtype=np.int64),),  # batch 2: a batch of 1 would export as fixed
    )
