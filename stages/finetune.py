"""DVC stage `finetune`: fine-tune models/pretrain on params.finetune's task (classify | sft) with the
one trainer, then export models/finetune (+ adapter/ for lora) and reports/finetune.

One process: `python -m stages.finetune`. Many: `torchrun --nproc_per_node=N -m stages.finetune`
(FSDP2 per block; rank 0 alone logs to MLflow and writes reports).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from lmforge.core import paths
from lmforge.core.stage import run_stage
from lmforge.core.io import write_json
from lmforge.data.tokens.tokenizer import load_tokenizer
from lmforge.core.digests import file_sha256
from lmforge.train.early_stopping import EarlyStopping
from lmforge.core.errors import LmforgeError
from lmforge.model.export import load_pretrained
from lmforge.train.export import save_finetuned
from lmforge.finetune.tuning import (
    apply_method, balanced_class_weights, check_labels, check_tokenizer_fits, count_params, encode_sft,
    encode_texts, is_peft, label_set, load_finetuned, merged_model, read_examples, special_ids,
    split_train_val, task_spec,
)
from lmforge.train.curves import plot_loss, write_csv
from lmforge.model.decoder import build_model
from lmforge.train.distributed import apply_fsdp, init_distributed
from lmforge.core.params import FinetuneParams, load_params
from lmforge.train.resume import result_knobs
from lmforge.track.lineage import content_hash
from lmforge.train.batches import Examples
from lmforge.train.trainer import Trainer
from lmforge.track.training import model_signature, register, training_run

log = logging.getLogger("stages.finetune")

MODEL_DIR = paths.FINETUNED
REPORTS = paths.FINETUNE_REPORTS
# The figures `dvc metrics show` and `dvc exp show` put side by side (metrics.json, numbers only);
# stats.json keeps the rest (task, method, parameter and example counts, world size).
COMPARED = ("steps", "best_step", "train_loss", "final_val_loss", "best_val_loss", "final_val_accuracy",
            "best_val_accuracy")


def check_tokenizer(tokenizer_path: Path) -> None:
    """models/pretrain's tokenizer must be the one data/tokenizer holds (when that exists)."""
    if paths.TOKENIZER.is_file() and file_sha256(paths.TOKENIZER) != file_sha256(tokenizer_path):
        raise LmforgeError(
            f"{tokenizer_path} differs from {paths.TOKENIZER}: models/pretrain was trained with another "
            "tokenizer; rerun `dvc repro pretrain` so model and data agree"
        )


def load_examples(fp: FinetuneParams, tokenizer: Any, eos_id: int) -> dict[str, Any]:
    """Read, check, split and encode train_file (and check test_file's fields and labels)."""
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


def run_fingerprint(fp: FinetuneParams) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the pretrained weights, the data, the knobs."""
    return {
        "finetune": result_knobs(fp),
        "pretrained": content_hash(paths.PRETRAINED / "model.safetensors"),
        "train_file": content_hash(Path(fp.train_file)),
    }


def main() -> None:
    params = load_params()
    fp = params.finetune
    info = init_distributed()
    torch.manual_seed(fp.seed)

    backbone, config = load_pretrained(paths.PRETRAINED)
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
    data = load_examples(fp, tokenizer, eos_id)
    labels = data["labels"]
    weights = None
    if fp.task == "classify" and fp.class_weights:
        weights = balanced_class_weights([label for _, label in data["train"]], len(labels))
    spec = task_spec(fp.task, pad_id, weights)

    model = build_model(backbone, fp.task, len(labels or []), fp.pooling)
    model = apply_method(model, fp.method, fp.task, fp.lora).to(info.device)
    trainable, total = count_params(model)
    if info.distributed:
        if fp.method == "lora":  # peft's save_pretrained / merge_and_unload do not handle FSDP's DTensors
            raise LmforgeError("finetune.method 'lora' runs in one process: use `python -m stages.finetune` "
                               "(not torchrun), or method 'full'")
        apply_fsdp(model)

    inputs = [paths.PRETRAINED, fp.train_file, fp.test_file]
    # The trainer counts examples, not tokens, for the classification loss.
    renames = {"tokens_per_s": "examples_per_s"} if fp.task == "classify" else {}
    with training_run("finetune", info, paths.FINETUNE_CHECKPOINTS, run_fingerprint(fp), params.runtime.finetune.resume,
                      {"finetune": fp}, inputs, renames) as tr:
        trainer = Trainer(
            model, params.trainer("finetune"), Examples(data["train"], data["val"], spec.collate, fp.max_length), dist_info=info,
            checkpoint_dir=paths.FINETUNE_CHECKPOINTS, loss_fn=spec.loss_fn, eval_fn=spec.eval_fn,
            on_metrics=tr.on_metrics, flops_per_token=config.flops_per_token(fp.max_length),
            early_stopping=EarlyStopping(fp.early_stopping_metric, fp.early_stopping_mode, fp.patience),
        )
        result = trainer.fit()  # ends with the best weights (by early_stopping_metric) loaded

        meta = {"task": fp.task, "method": fp.method, "labels": labels, "pooling": fp.pooling,
                "max_length": fp.max_length, "prompt_separator": fp.prompt_separator,
                "eos_token": params.tokenizer.eos_token, "pad_token": pad_token}
        with tempfile.TemporaryDirectory(prefix=".adapter.", dir=MODEL_DIR.parent if MODEL_DIR.parent.exists() else None) as tmp:
            adapter = None
            if is_peft(model):
                if info.is_main:
                    model.save_pretrained(tmp)  # the adapters alone (peft's format)
                adapter = Path(tmp)
            plain = merged_model(model)
            save_finetuned(plain, config, MODEL_DIR, meta, tokenizer_path=tokenizer_path, adapter_dir=adapter)  # collective

        if tr.run is None:  # not rank 0
            return
        run = tr.run
        records = tr.curve.read(up_to_step=result.step)
        best = result.best_metrics
        final = result.val_metrics or next((r for r in reversed(records) if "val_loss" in r), {})
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
            "train_examples": data["n_train"],
            "val_examples": data["n_val"],
            "world_size": info.world_size,
        }
        if fp.task == "classify":
            summary.update(final_val_accuracy=final.get("val_accuracy"), best_val_accuracy=best.get("val_accuracy"),
                           n_labels=len(labels))
        columns = ["step", "train_loss", "lr", "val_loss"] + (["val_accuracy"] if fp.task == "classify" else [])
        write_csv(REPORTS / "curve.csv", records, columns, blank_missing=True)
        plot_loss(REPORTS / "loss.png", records, None, f"fine-tune ({fp.task}, {fp.method})")
        write_json(REPORTS / "stats.json", summary)  # both the same whether tracking is up or down
        write_json(REPORTS / "metrics.json", {k: summary[k] for k in COMPARED if summary.get(k) is not None})
        quality = {k: summary.get(k) for k in ("best_val_loss", "final_val_loss", "best_val_accuracy",
                                                 "final_val_accuracy") if summary.get(k) is not None}
        run.log_metrics(quality, step=result.step)
        run.set_tags({f"lmforge.{k}": summary.get(k) for k in ("steps", "best_step", "stopped_early", "trainable_params",
                                                               "total_params", "train_examples", "val_examples",
                                                               "world_size", "n_labels")})
        if fp.task == "classify":
            signature = model_signature({"input_ids": ("int64", (-1, -1)), "lengths": ("int64", (-1,))},
                                        {"logits": ("float32", (-1, len(labels)))})
            what = f"a {len(labels)}-way classifier ({', '.join(labels)}): token ids + lengths -> logits"
        else:
            signature = model_signature({"input_ids": ("int64", (-1, -1))},
                                        {"logits": ("float32", (-1, -1, config.vocab_size))})
            what = "an SFT language model: prompt + separator -> response"
        register(run, load_finetuned(MODEL_DIR).model, paths.FINETUNED_MODEL, MODEL_DIR / "model.safetensors",
                 description=f"lmforge's fine-tuned model ({fp.method}): {what}. Load it with "
                             "lmforge.finetune.tuning.load_finetuned on the DVC output, or mlflow.pytorch.load_model.",
                 figures=quality, signature=signature, datasets={"finetune_train": Path(fp.train_file)})
        best_value = best.get(fp.early_stopping_metric)
        run.describe(f"Fine-tune ({fp.task}, {fp.method}) from models/pretrain for {result.step} steps on "
                     f"{data['n_train']:,} examples: best {fp.early_stopping_metric} "
                     f"{best_value if best_value is None else round(best_value, 4)} at step {result.best_step}; "
                     f"{trainable:,} of {total:,} parameters trained. Test figures: the evaluate run.")
        for name in ("stats.json", "curve.csv", "loss.png"):
            run.log_artifact(REPORTS / name, "reports")
        run.log_artifact(MODEL_DIR / "config.json", "model_config")
        if (MODEL_DIR / "adapter").is_dir():
            for path in sorted((MODEL_DIR / "adapter").iterdir()):
                run.log_artifact(path, "adapter")
        log.info("%s/%s: best %s %.4f at step %s of %d (%d of %d params trained)", fp.task, fp.method,
                 fp.early_stopping_metric, (best.get(fp.early_stopping_metric) or float("nan")),
                 result.best_step, result.step, trainable, total)


if __name__ == "__main__":
    run_stage("finetune", main)
