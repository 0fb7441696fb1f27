"""Fine-tuning a pretrained decoder on labeled data (classification head or SFT), trained by the one
trainer (`lmforge.train.trainer.Trainer`, pluggable collate/loss/eval), exported as safetensors + JSON.

Tasks
- `classify`: a head `nn.Linear(dim, n_labels)` on the final-norm hidden states. Each text is encoded,
  cut to `max_length - 1` tokens and followed by EOS; batches are right-padded to their longest row.
  Pooling `last` reads the hidden state of the last non-pad token (the EOS: in a causal decoder it has
  seen the whole text, and right padding never reaches it); `mean` averages over the non-pad tokens.
  Loss: cross-entropy (optionally class-weighted n / (n_labels * count)). Labels are strings: the
  sorted set of the TRAINING data's labels, saved with the model.
- `sft`: `prompt + prompt_separator` (encoded as one string), then `response`, then EOS; the loss is
  on the response and EOS tokens only (prompt and padding targets are IGNORE_INDEX, -100). Rows are
  padded (not packed) to the batch's longest row. A row longer than `max_length` keeps at most the last
  `max_length // 2` prompt tokens when the response needs the room; the response is cut at the end.

Methods: `full` (every weight), `frozen` (classify only: the backbone frozen, the head trained),
`lora` (peft's LoraConfig on the backbone's Linear layers named in `target_modules`; the classify head
is trained fully through `modules_to_save`). LoRA adapters are merged (`merge_and_unload`) into a plain
model for export and also saved alone (peft `save_pretrained`) to `<model_dir>/adapter/`.

The stable API (the evaluate stage uses it; the files are written and read by lmforge.model.export):
    model = load_finetuned("models/finetune", device="cpu")    # -> FinetunedModel, no pickles
    model.task, model.labels, model.config, model.meta
    classify: model.predict(texts) -> list[str]; model.predict_proba(texts) -> Tensor (N, n_labels);
              model.predict_logits(texts) -> Tensor (N, n_labels)      (batched, padded)
    sft:      model.generate(prompts, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None,
                             seed=0) -> list[str]   (the completions, EOS and after removed)
              model.lm_loss(prompts, responses) -> (summed CE over response+EOS tokens, n_tokens)
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.documents import split_of
from lmforge.data.sources.readers import MAX_WARNINGS_PER_FILE, TABLE_READERS, iter_table_rows, row_text
from lmforge.data.tokens.tokenizer import encode_plain
from lmforge.core.errors import LmforgeError
from lmforge.model.export import read_finetuned
from lmforge.model.decoder import IGNORE_INDEX, ModelConfig, Transformer, build_model
from lmforge.train.batches import Batch, Collate

from lmforge.model.loss import lm_loss

from lmforge.train.trainer import EvalFn, LossFn

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
log = logging.getLogger(__name__)

# --- data ---------------------------------------------------------------------------------------


def read_examples(path: str | Path, ft: Any, task: str | None = None) -> list[dict[str, Any]]:
    """The rows of `path` normalized to {"id", "text", "label"} (classify) or {"id", "prompt",
    "response"} (sft), read through `ft`'s field names (lmforge.core.params.FinetuneParams); "id" is None
    when the file has none.

    Read by ingest's readers (lmforge.data.sources.readers.iter_table_rows) with ingest's rules: invalid
    UTF-8 replaced by U+FFFD; lines that are not JSON objects, and rows whose field is missing,
    blank or not a string (a list, a dict, a number: never stringified), skipped, counted and warned
    about by file:line; a corrupt file or a missing column an error naming the file and the key.
    A label may also be an integer (class ids), read as its digits, as a CSV spells it."""
    task = task or ft.task
    fields_ = _task_fields(task, ft)
    key = "finetune.test_file" if ft.test_file is not None and str(path) == str(ft.test_file) else "finetune.train_file"
    path = _check_table_path(Path(path), key)
    required = {
        source: f"set finetune.{name}_field in params.yaml to the column that holds the {name}"
        for name, source in fields_.items()
    }
    columns = list(dict.fromkeys([*fields_.values(), "id"]))
    counters: Counter = Counter()
    examples, first_problem = [], None
    for row in iter_table_rows(str(path), columns, required, counters):
        example, problem = _example(row.values, fields_)
        if problem is not None:
            counters["rows_skipped"] += 1
            first_problem = first_problem or f"{row.where}: {problem}"
            if counters["rows_skipped"] <= MAX_WARNINGS_PER_FILE:
                log.warning("skipping %s: %s", row.where, problem)
            continue
        counters["replaced"] += row.replaced
        examples.append(example)
    _report_skipped(path, len(examples), counters, first_problem)
    return examples


def _task_fields(task: str, ft: Any) -> dict[str, str]:
    """Example key -> the file's field that holds it."""
    if task == "classify":
        return {"text": ft.text_field, "label": ft.label_field}
    if task == "sft":
        return {"prompt": ft.prompt_field, "response": ft.response_field}
    raise LmforgeError(f"finetune.task {task!r} is not one of classify, sft")


def _check_table_path(path: Path, params_key: str) -> Path:
    if not path.is_file():
        raise LmforgeError(f"{path} not found: create it (dvc repro) or point {params_key} at your file")
    if path.suffix.lower() not in TABLE_READERS:
        raise LmforgeError(
            f"{path}: unknown extension {path.suffix!r}; {params_key} must be a .jsonl, .parquet or .csv file"
        )
    return path


def _example(values: dict[str, Any], fields_: dict[str, str]) -> tuple[dict[str, Any] | None, str | None]:
    """(the example, None), or (None, what is wrong with the row, naming the field and its key)."""
    example = {"id": values.get("id")}
    for name, source in fields_.items():
        value = values.get(source)
        is_class_id = name == "label" and isinstance(value, int) and not isinstance(value, bool)
        text = str(value) if is_class_id else row_text(value)
        if text is None:
            if value is None:
                what = "is missing"
            elif isinstance(value, str):
                what = "is blank"
            else:
                what = f"is a {type(value).__name__}, not a string"
            return None, f"field {source!r} {what} (finetune.{name}_field)"
        example[name] = text
    return example, None


def _report_skipped(path: Path, kept: int, counters: Counter, first_problem: str | None) -> None:
    """Warn about what was skipped or replaced; no usable row at all is an error."""
    bad_lines, bad_rows = counters["bad_json_lines"], counters["rows_skipped"]
    if kept == 0 and bad_lines + bad_rows:
        first = first_problem or "lines that are not JSON objects"
        raise LmforgeError(
            f"{path}: no usable row ({bad_lines} lines not JSON objects, {bad_rows} rows skipped; first: "
            f"{first}): fix the file, or the finetune.*_field keys in params.yaml"
        )
    if bad_lines + bad_rows:
        log.warning(
            "%s: %d rows kept, %d skipped (%d lines not JSON objects, %d rows with a missing, blank or "
            "non-string field)", path, kept, bad_lines + bad_rows, bad_lines, bad_rows,
        )
    if counters["replaced"]:
        log.warning("%s: %d rows had invalid UTF-8 (or lone surrogates), replaced", path, counters["replaced"])


def row_key(row: dict[str, Any], text_field: str) -> str:
    """What the split hashes: the row's id, else its text."""
    value = row.get("id")
    return str(value) if value is not None else str(row.get(text_field, ""))


def split_train_val(
    rows: list[dict[str, Any]], val_fraction: float, text_field: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A stable split by `documents.split_of` (pretraining's rule) of each row's key, hashed first
    (fine-tuning ids are not hashes): a row is val when its bucket falls below val_fraction."""
    train, val = [], []
    for row in rows:
        digest = hashlib.blake2b(row_key(row, text_field).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
        (val if split_of(digest, val_fraction) == "val" else train).append(row)
    return train, val


def label_set(rows: list[dict[str, Any]], label_field: str, path: str | Path) -> list[str]:
    """The sorted labels of the training rows (as strings); at least two are needed."""
    if not rows:
        raise LmforgeError(f"{path} has no training rows: add labeled rows or lower finetune.val_fraction")
    labels = sorted({str(row[label_field]) for row in rows})
    if len(labels) < 2:
        raise LmforgeError(
            f"{path}: every training row has label {labels[0]!r}; a classifier needs at least two labels "
            f"in finetune.label_field {label_field!r}"
        )
    return labels


def check_labels(rows: list[dict[str, Any]], labels: Sequence[str], label_field: str, path: str | Path) -> None:
    """Every label of `rows` (e.g. the test file) must be one the model was trained on."""
    known = set(labels)
    for n, row in enumerate(rows, 1):
        label = str(row[label_field])
        if label not in known:
            raise LmforgeError(
                f"{path}: row {n} has label {label!r}, which the training data never shows (labels: "
                f"{sorted(known)}): add training rows with it or drop it from the test file"
            )


# --- tokenization and batches -------------------------------------------------------------------


def special_ids(tokenizer: Any, eos_token: str = EOS_TOKEN, pad_token: str = PAD_TOKEN) -> tuple[int, int]:
    """(eos id, pad id); pad falls back to EOS when the tokenizer has no pad token."""
    eos = tokenizer.token_to_id(eos_token)
    if eos is None:
        raise LmforgeError(f"the tokenizer has no {eos_token!r} token: use the tokenizer the model was pretrained with")
    pad = tokenizer.token_to_id(pad_token)
    return int(eos), int(eos if pad is None else pad)


def check_tokenizer_fits(tokenizer: Any, config: ModelConfig) -> None:
    config.check_vocab(tokenizer.get_vocab_size(with_added_tokens=True))


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int, eos_id: int) -> list[list[int]]:
    """Each text's ids cut to max_length - 1, then EOS (the token `last` pooling reads; the only
    special id: text that spells "<|endoftext|>" is encoded as text)."""
    return [ids[: max_length - 1] + [eos_id] for ids in encode_plain(tokenizer, texts)]


def encode_sft(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], max_length: int, separator: str, eos_id: int
) -> list[tuple[list[int], int]]:
    """(ids, prompt length) per pair: ids = encode(prompt + separator) + encode(response) + [EOS]
    (the only special id: text that spells "<|endoftext|>" is encoded as text)."""
    p_ids = encode_plain(tokenizer, [p + separator for p in prompts])
    r_ids = encode_plain(tokenizer, responses)
    out = []
    for prompt, response in zip(p_ids, r_ids):
        response = response + [eos_id]
        if len(prompt) + len(response) > max_length:
            keep_prompt = max(max_length - len(response), min(len(prompt), max_length // 2))
            prompt = prompt[len(prompt) - keep_prompt:] if keep_prompt else []
            response = response[: max_length - len(prompt)]
        out.append((prompt + response, len(prompt)))
    return out


def classify_collate(pad_id: int) -> Collate:
    """[(ids, label index)] -> input_ids (B, T) right-padded, lengths (B,), labels (B,)."""

    def collate(rows: list[Any]) -> Batch:
        longest = max(len(ids) for ids, _ in rows)
        x = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        for i, (ids, _) in enumerate(rows):
            x[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        return {
            "input_ids": x,
            "lengths": torch.tensor([len(ids) for ids, _ in rows], dtype=torch.long),
            "labels": torch.tensor([label for _, label in rows], dtype=torch.long),
        }

    return collate


def sft_collate(pad_id: int) -> Collate:
    """[(ids, prompt length)] -> inputs (B, T-1) and targets with IGNORE_INDEX on prompt and padding."""

    def collate(rows: list[Any]) -> Batch:
        longest = max(len(ids) for ids, _ in rows) - 1
        inputs = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        targets = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(rows):
            seq = torch.as_tensor(ids, dtype=torch.long)
            inputs[i, : len(ids) - 1] = seq[:-1]
            targets[i, : len(ids) - 1] = seq[1:]
            # targets[j] predicts ids[j + 1]: those inside the prompt are not learned.
            targets[i, : max(n_prompt - 1, 0)] = IGNORE_INDEX
        return {"inputs": inputs, "targets": targets}

    return collate


# --- models -------------------------------------------------------------------------------------


def classify_loss(class_weights: torch.Tensor | None = None) -> LossFn:
    """(summed CE over the batch's examples, number of examples); weighted: (sum w*CE, sum w)."""

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], lengths=batch["lengths"]).float()
        labels = batch["labels"]
        losses = F.cross_entropy(logits, labels, reduction="none")
        if class_weights is None:
            return losses.sum(), torch.tensor(labels.numel(), device=labels.device)
        w = class_weights.to(logits.device)[labels]
        return (losses * w).sum(), w.sum()

    return loss_fn


def classify_eval(model: nn.Module, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    logits = model(input_ids=batch["input_ids"], lengths=batch["lengths"])
    correct = (logits.argmax(-1) == batch["labels"]).sum()
    return {"val_accuracy": (correct, torch.tensor(batch["labels"].numel()))}


def balanced_class_weights(label_ids: Sequence[int], n_labels: int) -> torch.Tensor:
    counts = np.bincount(np.asarray(label_ids, dtype=np.int64), minlength=n_labels).astype(np.float64)
    return torch.tensor(len(label_ids) / (n_labels * np.maximum(counts, 1.0)), dtype=torch.float32)


@dataclass
class TaskSpec:
    """What the trainer needs for one task: the batch builder, the objective, the extra val metrics."""

    collate: Collate
    loss_fn: LossFn
    eval_fn: EvalFn | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def task_spec(task: str, pad_id: int, class_weights: torch.Tensor | None = None) -> TaskSpec:
    if task == "classify":
        return TaskSpec(classify_collate(pad_id), classify_loss(class_weights), classify_eval)
    if task == "sft":
        return TaskSpec(sft_collate(pad_id), lm_loss)
    raise LmforgeError(f"finetune.task {task!r} is not one of classify, sft")


# --- methods: full, frozen, lora --------------------------------------------------------------


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
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def merged_model(model: nn.Module) -> nn.Module:
    """A plain module: LoRA adapters merged into the base weights (in place) and peft unwrapped."""
    return model.merge_and_unload() if is_peft(model) else model


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, shared tensors counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


class FinetunedModel:
    """A fine-tuned model loaded for inference (see the module docstring for the API)."""

    def __init__(self, model: nn.Module, config: ModelConfig, meta: dict[str, Any], tokenizer: Any,
                 device: str | torch.device = "cpu") -> None:
        self.model = model.eval()
        self.config, self.meta, self.tokenizer = config, meta, tokenizer
        self.task: str = meta["task"]
        self.labels: list[str] = list(meta.get("labels") or [])
        self.max_length: int = int(meta["max_length"])
        self.prompt_separator: str = meta.get("prompt_separator", "\n")
        self.device = torch.device(device)
        self.eos_id, self.pad_id = special_ids(tokenizer, meta.get("eos_token", EOS_TOKEN), meta.get("pad_token", PAD_TOKEN))

    def _need(self, task: str, what: str) -> None:
        if self.task != task:
            raise LmforgeError(f"{what} is for task {task!r}; this model was fine-tuned for {self.task!r}")

    @torch.no_grad()
    def predict_logits(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(N, n_labels) float32 logits, in `labels` order."""
        self._need("classify", "predict")
        ids = encode_texts(self.tokenizer, list(texts), min(self.max_length, self.config.max_seq_len), self.eos_id)
        collate = classify_collate(self.pad_id)
        out = []
        for start in range(0, len(ids), batch_size):
            batch = collate([(row, 0) for row in ids[start : start + batch_size]])
            logits = self.model(input_ids=batch["input_ids"].to(self.device), lengths=batch["lengths"].to(self.device))
            out.append(logits.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        return self.predict_logits(texts, batch_size).softmax(-1)

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[str]:
        return [self.labels[i] for i in self.predict_logits(texts, batch_size).argmax(-1).tolist()]

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
        top_k: int | None = None, top_p: float | None = None, seed: int | None = 0,
    ) -> list[str]:
        """The completion of each `prompt + prompt_separator`, up to EOS (not included)."""
        from lmforge.model.generate import generate

        self._need("sft", "generate")
        outs = []
        budget = self.config.max_seq_len - max_new_tokens
        if budget < 1:
            raise LmforgeError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in max_seq_len {self.config.max_seq_len}")
        for prompt in prompts:
            ids = encode_plain(self.tokenizer, [prompt + self.prompt_separator])[0][-budget:] or [self.eos_id]
            out = generate(self.model, torch.tensor([ids]), max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, eos_id=self.eos_id, seed=seed)[0, len(ids):].tolist()
            if self.eos_id in out:
                out = out[: out.index(self.eos_id)]
            outs.append(self.tokenizer.decode(out))
        return outs

    @torch.no_grad()
    def lm_loss(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32) -> tuple[float, int]:
        """(summed cross-entropy over the response + EOS tokens, number of those tokens), as in training."""
        self._need("sft", "lm_loss")
        if len(prompts) != len(responses):
            raise LmforgeError(f"{len(prompts)} prompts but {len(responses)} responses: pass one response per prompt")
        rows = encode_sft(self.tokenizer, prompts, responses, min(self.max_length, self.config.max_seq_len + 1),
                          self.prompt_separator, self.eos_id)
        collate = sft_collate(self.pad_id)
        total, count = 0.0, 0
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(self.device) for k, v in collate(rows[start : start + batch_size]).items()}
            loss_sum, n = lm_loss(self.model, batch)
            total, count = total + float(loss_sum), count + int(n)
        return total, count


def load_finetuned(model_dir: str | Path, device: str | torch.device = "cpu") -> FinetunedModel:
    """The model the finetune stage exported (lmforge.train.export.save_finetuned), ready for inference."""
    from lmforge.data.tokens.tokenizer import load_tokenizer

    model, config, meta = read_finetuned(model_dir, device)
    return FinetunedModel(model, config, meta, load_tokenizer(Path(model_dir) / "tokenizer.json"), device)
