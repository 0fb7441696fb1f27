"""Fine-tuning examples: labeled rows read from a table file (checked, skipped rows counted), split
into train and val by a stable hash, encoded for the task and collated into right-padded batches.

`classify`: each text is encoded, cut to `max_length - 1` tokens and followed by EOS. `sft`:
`prompt + prompt_separator` (encoded as one string), then `response`, then EOS; the targets of the
prompt and padding are IGNORE_INDEX (-100), so the loss is on the response and EOS tokens only. Rows
are padded (not packed) to the batch's longest row. A row longer than `max_length` keeps at most the
last `max_length // 2` prompt tokens when the response needs the room; the response is cut at the end.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.core.errors import LmforgeError
from lmforge.data.documents import split_of
from lmforge.data.sources.readers import MAX_WARNINGS_PER_FILE, TABLE_READERS, iter_table_rows, row_text
from lmforge.data.tokens.tokenizer import encode_plain
from lmforge.model.decoder import IGNORE_INDEX, ModelConfig
from lmforge.train.batches import Batch, Collate


EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
log = logging.getLogger(__name__)


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
