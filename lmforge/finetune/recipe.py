"""The finetune stage's recipe: models/pretrain and its tokenizer checked against the data, the
task's examples read, split and encoded, the method applied (LoRA in one process only), the trainer
assembled, the result exported (with LoRA's adapters beside the merged weights), and the report.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lmforge.core import paths
from lmforge.core.digests import content_hash, file_sha256
from lmforge.core.errors import LmforgeError
from lmforge.core.params import FinetuneParams, Params
from lmforge.data.tokens.tokenizer import load_tokenizer
from lmforge.finetune.examples import (
    check_labels, check_tokenizer_fits, encode_sft, encode_texts, label_set, read_examples, special_ids,
    split_train_val,
)
from lmforge.finetune.methods import apply_method, count_params, is_peft, merged_model
from lmforge.finetune.objectives import balanced_class_weights, task_spec
from lmforge.model.decoder import ModelConfig, build_model
from lmforge.model.export import load_pretrained
from lmforge.train.batches import Examples
from lmforge.train.distributed import DistInfo, apply_fsdp
from lmforge.train.early_stopping import EarlyStopping
from lmforge.train.export import save_finetuned
from lmforge.train.report import Registration, TrainingReport
from lmforge.train.resume import result_knobs
from lmforge.train.trainer import Trainer, TrainResult

# The figures `dvc metrics show` and `dvc exp show` put side by side (metrics.json, numbers only);
# stats.json keeps the rest (task, method, parameter and example counts, world size).
COMPARED = ("steps", "best_step", "train_loss", "final_val_loss", "best_val_loss", "final_val_accuracy",
            "best_val_accuracy")
QUALITY = ("best_val_loss", "final_val_loss", "best_val_accuracy", "final_val_accuracy")


@dataclass
class Setup:
    """What fine-tuning starts from: the pretrained backbone, its tokenizer and the encoded examples."""

    backbone: nn.Module
    config: ModelConfig
    tokenizer_path: Path
    pad_token: str
    pad_id: int
    data: dict[str, Any]


def check_tokenizer(tokenizer_path: Path) -> None:
    """models/pretrain's tokenizer must be the one data/tokenizer holds (when that exists)."""
    if paths.TOKENIZER.is_file() and file_sha256(paths.TOKENIZER) != file_sha256(tokenizer_path):
        raise LmforgeError(
            f"{tokenizer_path} differs from {paths.TOKENIZER}: models/pretrain was trained with another "
            "tokenizer; rerun `dvc repro pretrain` so model and data agree"
        )


def train_val_rows(fp: FinetuneParams) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """train_file's rows split into the ones trained on and the validation ones, in file order."""
    rows = read_examples(fp.train_file, fp)
    if not rows:
        raise LmforgeError(f"{fp.train_file} has no rows: point finetune.train_file at labeled data")
    key_field = "text" if fp.task == "classify" else "prompt"
    train_rows, val_rows = split_train_val(rows, fp.val_fraction, key_field)
    if not val_rows or not train_rows:
        raise LmforgeError(
            f"{fp.train_file}: the val_fraction {fp.val_fraction} split of its {len(rows)} rows leaves "
            f"{len(train_rows)} train and {len(val_rows)} val rows: add rows or change finetune.val_fraction"
        )
    return train_rows, val_rows


def load_examples(fp: FinetuneParams, tokenizer: Any, eos_id: int) -> dict[str, Any]:
    """Read, check, split and encode train_file (and check test_file's fields and labels)."""
    train_rows, val_rows = train_val_rows(fp)
    test_rows = read_examples(fp.test_file, fp) if fp.test_file is not None else []
    out: dict[str, Any] = {"n_train": len(train_rows), "n_val": len(val_rows), "labels": None}
    if fp.task == "classify":
        labels = label_set(train_rows, "label", fp.train_file)
        index = {label: i for i, label in enumerate(labels)}
        check_labels(test_rows, labels, "label", fp.test_file)
        check_labels(val_rows, labels, "label", f"{fp.train_file} (its val split)")

        def encode(part: list[dict[str, Any]]) -> list[tuple[list[int], int]]:
            ids = encode_texts(tokenizer, [r["text"] for r in part], fp.max_length, eos_id)
            return list(zip(ids, [index[r["label"]] for r in part]))

        out["labels"] = labels
    else:
        def encode(part: list[dict[str, Any]]) -> list[tuple[list[int], int]]:
            return encode_sft(tokenizer, [r["prompt"] for r in part], [r["response"] for r in part],
                              fp.max_length, fp.prompt_separator, eos_id)

    out["train"], out["val"] = encode(train_rows), encode(val_rows)
    return out


def prepare(params: Params, from_scratch: bool = False) -> Setup:
    """models/pretrain with its tokenizer (checked against data/tokenizer and the model's vocabulary)
    and train_file's examples encoded for the task, within what the model reads. `from_scratch`:
    models/pretrain's architecture with randomly initialised weights (evaluate's baseline)."""
    fp = params.finetune
    backbone, config = load_pretrained(paths.PRETRAINED, random_init=from_scratch)
    tokenizer_path = paths.PRETRAINED / "tokenizer.json"
    check_tokenizer(tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    check_tokenizer_fits(tokenizer, config)
    pad_token = next((t for t in params.tokenizer.special_tokens if "pad" in t.lower()), params.tokenizer.eos_token)
    eos_id, pad_id = special_ids(tokenizer, params.tokenizer.eos_token, pad_token)
    limit = config.max_seq_len + (1 if fp.task == "sft" else 0)  # sft rows hold inputs + 1 shifted target
    if fp.max_length > limit:
        raise LmforgeError(
            f"finetune.max_length {fp.max_length} exceeds what models/pretrain reads ({limit} tokens for "
            f"{fp.task}): lower finetune.max_length"
        )
    return Setup(backbone, config, tokenizer_path, pad_token, pad_id, load_examples(fp, tokenizer, eos_id))


def run_fingerprint(fp: FinetuneParams) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the pretrained weights, the data, the knobs."""
    return {
        "finetune": result_knobs(fp),
        "pretrained": content_hash(paths.PRETRAINED / "model.safetensors"),
        "train_file": content_hash(Path(fp.train_file)),
    }


def build_model_to_train(fp: FinetuneParams, setup: Setup, info: DistInfo) -> tuple[nn.Module, tuple[int, int]]:
    """The backbone with the task's head, the method applied, on this process's device, and its
    (trainable, total) parameter counts; FSDP2 over many processes (LoRA refused there: peft's
    save_pretrained / merge_and_unload do not handle FSDP's DTensors)."""
    model = build_model(setup.backbone, fp.task, len(setup.data["labels"] or []), fp.pooling)
    model = apply_method(model, fp.method, fp.task, fp.lora).to(info.device)
    counts = count_params(model)
    if info.distributed:
        if fp.method == "lora":
            raise LmforgeError("finetune.method 'lora' runs in one process: use `python -m stages.finetune` "
                               "(not torchrun), or method 'full'")
        apply_fsdp(model)
    return model, counts


def build_trainer(model: nn.Module, params: Params, setup: Setup, info: DistInfo, on_metrics: Any,
                  checkpoint_dir: Path | None = paths.FINETUNE_CHECKPOINTS) -> Trainer:
    """The one trainer over padded examples with the task's objective and early stopping;
    `checkpoint_dir` None: no checkpoints, nothing resumed (evaluate's runs in memory)."""
    fp, data = params.finetune, setup.data
    weights = None
    if fp.task == "classify" and fp.class_weights:
        weights = balanced_class_weights([label for _, label in data["train"]], len(data["labels"]))
    spec = task_spec(fp.task, setup.pad_id, weights, fp.label_smoothing)
    return Trainer(
        model, params.trainer("finetune"), Examples(data["train"], data["val"], spec.collate, fp.max_length),
        dist_info=info,
        checkpoint_dir=checkpoint_dir, loss_fn=spec.loss_fn, eval_fn=spec.eval_fn,
        on_metrics=on_metrics, flops_per_token=setup.config.flops_per_token(fp.max_length),
        early_stopping=EarlyStopping(fp.early_stopping_metric, fp.early_stopping_mode, fp.patience),
    )


def model_meta(params: Params, setup: Setup) -> dict[str, Any]:
    """What inference needs beside the weights (lmforge.finetune.inference.FinetunedModel's `meta`)."""
    fp = params.finetune
    return {"task": fp.task, "method": fp.method, "labels": setup.data["labels"], "pooling": fp.pooling,
            "max_length": fp.max_length, "prompt_separator": fp.prompt_separator,
            "eos_token": params.tokenizer.eos_token, "pad_token": setup.pad_token}


def export(model: nn.Module, params: Params, setup: Setup, info: DistInfo) -> None:
    """models/finetune: the plain (LoRA: merged) weights, the task's metadata and the tokenizer, and
    LoRA's adapters alone (peft's format) in adapter/; collective under FSDP."""
    meta = model_meta(params, setup)
    model_dir = paths.FINETUNED
    with tempfile.TemporaryDirectory(prefix=".adapter.", dir=model_dir.parent if model_dir.parent.exists() else None) as tmp:
        adapter = None
        if is_peft(model):
            if info.is_main:
                model.save_pretrained(tmp)
            adapter = Path(tmp)
        save_finetuned(merged_model(model), setup.config, model_dir, meta, tokenizer_path=setup.tokenizer_path,
                       adapter_dir=adapter)


def summarize(fp: FinetuneParams, result: TrainResult, records: list[dict[str, Any]], counts: tuple[int, int],
              setup: Setup, info: DistInfo) -> dict[str, Any]:
    """stats.json: the last and the best (by early_stopping_metric) val figures, the counts."""
    best = result.best_metrics
    final = result.val_metrics or next((r for r in reversed(records) if "val_loss" in r), {})
    trainable, total = counts
    summary: dict[str, Any] = {
        "task": fp.task,
        "method": fp.method,
        "steps": result.step,
        "stopped_early": result.stopped_early,
        "best_step": result.best_step,
        "train_loss": result.train_loss if result.train_loss is not None else
                      next((r["train_loss"] for r in reversed(records) if "train_loss" in r), None),
        "final_val_loss": final.get("val_loss"),
        "best_val_loss": best.get("val_loss"),
        "trainable_params": trainable,
        "total_params": total,
        "train_examples": setup.data["n_train"],
        "val_examples": setup.data["n_val"],
        "world_size": info.world_size,
    }
    if fp.task == "classify":
        summary.update(final_val_accuracy=final.get("val_accuracy"), best_val_accuracy=best.get("val_accuracy"),
                       n_labels=len(setup.data["labels"]))
    return summary


def report(fp: FinetuneParams, result: TrainResult, records: list[dict[str, Any]],
           summary: dict[str, Any]) -> TrainingReport:
    """The finetune stage's report files, run figures, tags, description and artifacts."""
    reports, model_dir = paths.FINETUNE_REPORTS, paths.FINETUNED
    best_value = result.best_metrics.get(fp.early_stopping_metric)
    description = (f"Fine-tune ({fp.task}, {fp.method}) from models/pretrain for {result.step} steps on "
                   f"{summary['train_examples']:,} examples: best {fp.early_stopping_metric} "
                   f"{best_value if best_value is None else round(best_value, 4)} at step {result.best_step}; "
                   f"{summary['trainable_params']:,} of {summary['total_params']:,} parameters trained. "
                   "Test figures: the evaluate run.")
    adapter = model_dir / "adapter"
    return TrainingReport(
        reports=reports, records=records, summary=summary, compared=COMPARED,
        columns=["step", "train_loss", "lr", "val_loss"] + (["val_accuracy"] if fp.task == "classify" else []),
        title=f"fine-tune ({fp.task}, {fp.method})", baseline=None, final=QUALITY, loss_label=loss_label(fp.task),
        tagged=("steps", "best_step", "stopped_early", "trainable_params", "total_params", "train_examples",
                "val_examples", "world_size", "n_labels"),
        description=description,
        artifacts={"reports": [reports / name for name in ("stats.json", "curve.csv", "loss.png")],
                   "model_config": [model_dir / "config.json"],
                   "adapter": sorted(adapter.iterdir()) if adapter.is_dir() else []},
    )


def loss_label(task: str) -> str:
    """The fine-tuning loss's unit: one classification per example; SFT's loss is per response token."""
    return "cross-entropy (nats/example)" if task == "classify" else "cross-entropy (nats/token)"


def registration(fp: FinetuneParams, labels: list[str] | None, config: ModelConfig,
                 summary: dict[str, Any]) -> Registration:
    """models/finetune's card in the registry: a classifier (ids + lengths -> logits) or an SFT model."""
    ids = np.zeros((2, 8), dtype=np.int64)  # batch 2: a batch of 1 would export as fixed
    if fp.task == "classify":
        labels = labels or []
        signature = ({"input_ids": ("int64", (-1, -1)), "lengths": ("int64", (-1,))},
                     {"logits": ("float32", (-1, len(labels)))})
        example: tuple[Any, ...] = (ids, np.array([8, 5], dtype=np.int64))
        what = f"a {len(labels)}-way classifier ({', '.join(labels)}): token ids + lengths -> logits"
    else:
        signature = ({"input_ids": ("int64", (-1, -1))}, {"logits": ("float32", (-1, -1, config.vocab_size))})
        example = (ids,)
        what = "an SFT language model: prompt + separator -> response"
    return Registration(
        loader="finetuned", name=paths.FINETUNED_MODEL, weights=paths.FINETUNED / "model.safetensors",
        description=f"lmforge's fine-tuned model ({fp.method}): {what}. Load it with "
                    "lmforge.finetune.inference.load_finetuned on the DVC output, or mlflow.pytorch.load_model.",
        figures={key: summary[key] for key in QUALITY if summary.get(key) is not None},
        signature=signature, input_example=example, datasets={"finetune_train": Path(fp.train_file)},
    )

