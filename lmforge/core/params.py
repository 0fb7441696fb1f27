"""Typed params: one pydantic model per params.yaml section, validated at load.

An unknown key or a bad value is an `LmforgeError` naming the key and what is allowed. What loading
accepts is bounded (file size, values once YAML aliases are expanded, nesting) and a message quotes
at most the start of a value: a hostile or broken file costs a second, never a hung stage.
"""

from __future__ import annotations

import json
import os
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmforge.core.errors import LmforgeError
from lmforge.core.presets import PRESETS

DEFAULT_PARAMS_PATH = Path("params.yaml")
# Longest context a row may hold: far beyond any preset, and still an int32 index everywhere.
MAX_SEQ_LEN = 2**20
# params.yaml is a few KB: a file of a megabyte is not one (and is never read whole).
MAX_PARAMS_BYTES = 1_000_000
# Values (scalars, lists, mappings) the file may hold once its YAML aliases are expanded; the
# repository's holds ~200. A "billion laughs" file of 10 lines expands to 9**9 values, which
# validation (and its messages) would walk for hours while the loaded objects stay small.
MAX_PARAMS_VALUES = 100_000
# Characters of a value, and errors, that a message quotes at most.
MAX_QUOTED_CHARS = 100
MAX_LISTED_ERRORS = 10
# Set to a file, each stage process appends the params keys it read there (tests/test_params_deps.py
# compares them with dvc.yaml's `params:`).
TRACE_ENV = "LMFORGE_PARAMS_TRACE"
# The dotted keys read from a loaded params file, while tracing (None: not tracing).
_read_keys: set[str] | None = None


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, values are immutable."""

    # inf/nan are never a sensible knob (an lr of nan trains all-NaN weights): refused at load.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if _read_keys is not None and not name.startswith("_") and not isinstance(value, Section):
            prefix = _SECTION_KEYS.get(type(self))
            if prefix is not None and name in type(self).model_fields:
                _read_keys.add(f"{prefix}.{name}")
        return value


class HfSourceParams(Section):
    """A Hugging Face Hub dataset, streamed (never used by the tests or the default run)."""

    name: str = "Salesforce/wikitext"
    config: str | None = "wikitext-103-raw-v1"
    split: str = "train"
    revision: str | None = None
    max_documents: int | None = Field(None, gt=0)


class DataParams(Section):
    """`ingest`: where documents come from and how the train/val split is drawn."""

    source: Literal["builtin", "files", "hf"] = "builtin"
    files: list[str] = ["data/corpus/**/*.txt"]
    text_field: str = "text"
    # None: one document per .txt file; otherwise the string that separates documents.
    txt_separator: str | None = None
    hf: HfSourceParams = HfSourceParams()
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    batch_size: int = Field(2000, gt=0)
    # Target size of one partition, the unit of parallel work of ingest, clean and tokenize.
    partition_mb: float = Field(64.0, gt=0)

    @model_validator(mode="after")
    def _files_need_globs(self) -> DataParams:
        if self.source == "files" and not self.files:
            raise ValueError("data.source is 'files' but data.files is empty: list at least one glob")
        return self


class EngineParams(Section):
    """Where the data stages run their partitions: an embedded Dask cluster or an existing one."""

    # None: an embedded LocalCluster on this machine; "tcp://host:8786": join that Dask scheduler.
    address: str | None = None
    # Embedded only: worker processes (one thread each: the filters hold the GIL); None: the cores.
    workers: int | None = Field(None, gt=0)
    # Serve Dask's dashboard (embedded: a free port on 127.0.0.1) and print its link.
    dashboard: bool = False

    @field_validator("address")
    @classmethod
    def _scheduler_url(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError("give the scheduler's URL, e.g. tcp://10.0.0.5:8786 (or null for the embedded engine)")
        return value


class CleanParams(Section):
    """`clean`: thresholds of each filter (Gopher-style quality rules, then dedup)."""

    min_chars: int = Field(16, ge=0)
    max_chars: int = Field(200_000, gt=0)
    min_words: int = Field(3, ge=0)
    max_words: int = Field(50_000, gt=0)
    min_mean_word_length: float = Field(2.0, ge=0)
    max_mean_word_length: float = Field(15.0, gt=0)
    # Fraction of characters that are neither letters, digits nor whitespace.
    max_symbol_ratio: float = Field(0.35, ge=0, le=1)
    # Fraction of words that contain at least one letter.
    min_alpha_word_ratio: float = Field(0.5, ge=0, le=1)
    # Fraction of characters in lines that occur more than once.
    # Gopher's web values are 0.3 / {2: .20, 3: .18, 4: .16} / {5: .15 ... 10: .10}; docstrings
    # with doctest examples repeat legitimately, so the defaults are looser (README: clean).
    max_duplicate_line_char_fraction: float = Field(0.5, ge=0, le=1)
    # n -> max fraction of characters covered by the single most frequent n-gram (n = 2..4).
    max_top_ngram_char_fraction: dict[int, float] = {2: 0.30, 3: 0.30, 4: 0.30}
    # n -> max fraction of characters covered by n-grams that occur more than once (n = 5..10).
    max_duplicate_ngram_char_fraction: dict[int, float] = {
        5: 0.50, 6: 0.45, 7: 0.40, 8: 0.35, 9: 0.30, 10: 0.30
    }
    exact_dedup: bool = True
    near_dedup: bool = True
    minhash_threshold: float = Field(0.8, gt=0, le=1)
    minhash_num_perm: int = Field(128, ge=16, le=1024)
    minhash_shingle_size: int = Field(5, ge=1)
    minhash_seed: int = 42
    rejected_samples_per_reason: int = Field(5, ge=0)
    batch_size: int = Field(2000, gt=0)

    @field_validator("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction")
    @classmethod
    def _fractions(cls, value: dict[int, float]) -> dict[int, float]:
        for n, fraction in value.items():
            if n < 1 or not 0 <= fraction <= 1:
                raise ValueError(f"entry {n}: {fraction} needs n >= 1 and a fraction in [0, 1]")
        return value


class TokenizerParams(Section):
    """`tokenize`: the byte-level BPE and how its ids are packed into shards."""

    vocab_size: int = Field(8192, ge=300, le=2**32)  # shard ids are uint32 at most
    seq_len: int = Field(256, ge=8, le=MAX_SEQ_LEN)
    min_frequency: int = Field(2, ge=1)
    eos_token: str = "<|endoftext|>"
    special_tokens: list[str] = ["<|endoftext|>", "<|pad|>"]
    encode_batch_size: int = Field(2048, gt=0)
    shard_rows: int = Field(4096, gt=0)
    # The BPE trains on about this many MB of train-split text, chosen by a hash of each document's
    # id, so its cost does not grow with the corpus (a corpus smaller than this is used whole).
    train_sample_mb: float = Field(100.0, gt=0)

    @model_validator(mode="after")
    def _eos_is_special(self) -> TokenizerParams:
        if self.eos_token not in self.special_tokens:
            raise ValueError(
                f"tokenizer.eos_token {self.eos_token!r} must be listed in tokenizer.special_tokens"
            )
        return self


class ModelParams(Section):
    """`pretrain`'s model shape: a preset (lmforge.model.decoder.PRESETS) with optional overrides.

    vocab_size and max_seq_len are not here: they come from the tokenizer (vocab size, seq_len).
    """

    preset: str = "small"  # a name in lmforge.core.presets.PRESETS
    dim: int | None = Field(None, gt=0)
    n_layers: int | None = Field(None, gt=0)
    n_heads: int | None = Field(None, gt=0)
    n_kv_heads: int | None = Field(None, gt=0)
    ffn_dim_multiplier: float | None = Field(None, gt=0)
    multiple_of: int | None = Field(None, gt=0)
    rope_theta: float | None = Field(None, gt=0)
    norm_eps: float | None = Field(None, gt=0)
    tie_embeddings: bool | None = None

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}: choose one of {', '.join(PRESETS)}")
        return value

    def overrides(self) -> dict[str, Any]:
        """The fields set here, to pass to lmforge.model.decoder.build_config(preset, **overrides)."""
        # Read field by field (not model_dump): a traced run records each key it reads (params_trace).
        values = {name: getattr(self, name) for name in type(self).model_fields if name != "preset"}
        return {name: value for name, value in values.items() if value is not None}


class TrainingKnobs(Section):
    """The knobs of the one training loop that change what it computes, shared by `pretrain` and
    `finetune`. Each knob is declared once, here, with pretraining's default; `finetune` redeclares
    only the defaults that differ. params.yaml states the same values (tests/test_trainer.py holds
    them equal). How a run executes (checkpoints, progress bars, processes) is in `runtime:`."""

    section: ClassVar[str] = "trainer"

    max_steps: int = Field(240, gt=0)
    # Optional token budget; training stops at whichever of max_steps / max_tokens comes first.
    max_tokens: int | None = Field(None, gt=0)
    micro_batch_size: int = Field(16, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    lr: float = Field(2e-3, gt=0)
    min_lr: float = Field(2e-4, ge=0)
    warmup_steps: int = Field(24, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    eval_every: int = Field(40, ge=0)  # 0: only at the end
    eval_batches: int = Field(8, gt=0)
    seed: int = 1337

    @model_validator(mode="after")
    def _min_lr_below_lr(self) -> TrainingKnobs:
        if self.min_lr > self.lr:
            raise ValueError(f"{self.section}.min_lr {self.min_lr} is above {self.section}.lr {self.lr}")
        return self


class TrainingRuntime(Section):
    """`runtime.pretrain` / `runtime.finetune`: how a training run executes, never what it computes
    (a resumed run gives what an uninterrupted one would), so no stage reruns when they change."""

    checkpoint_every: int = Field(40, ge=0)  # 0: only at the end
    keep_checkpoints: int = Field(2, gt=0)
    resume: Literal["auto", "never"] = "auto"
    progress: bool = True


class TrainerParams(TrainingKnobs, TrainingRuntime):
    """What lmforge.train.trainer.Trainer reads: a stage's training knobs and its run-time knobs
    together (Params.trainer builds it from params.yaml; tests and benchmarks build it directly)."""


class PretrainParams(TrainingKnobs):
    """`pretrain`: the training loop's knobs (TrainingKnobs) and the attention's layout."""

    section: ClassVar[str] = "pretrain"

    # Attention stays inside each packed document and rotary positions restart at it (lmforge.model.attention).
    document_mask: bool = False


class PretrainRuntime(TrainingRuntime):
    """`runtime.pretrain`: checkpoints, progress, and how the computation is laid out on the hardware."""

    # Processes on this machine (one per GPU): lmforge.train.launch runs torch.distributed.run when > 1.
    nproc: int = Field(1, ge=1)
    # Applied by lmforge.train.distributed, not by the trainer.
    activation_checkpointing: bool = False
    compile: bool = False
    # > 0: the loss runs this many tokens at a time, never holding the whole logits (lmforge.model.loss).
    loss_chunk_tokens: int = Field(0, ge=0)
    # Checkpoints written by a background thread from a staged CPU copy (lmforge.train.checkpoint).
    async_checkpoint: bool = False


class EvaluateRuntime(Section):
    """`runtime.evaluate`: how evaluate batches its work (the figures do not depend on it)."""

    lm_micro_batch_size: int = Field(16, gt=0)


class RuntimeParams(Section):
    """`runtime`: knobs that change how stages run, never what they produce. No stage lists this
    section in dvc.yaml, so changing one reruns nothing."""

    pretrain: PretrainRuntime = PretrainRuntime()
    finetune: TrainingRuntime = TrainingRuntime()
    evaluate: EvaluateRuntime = EvaluateRuntime()


class LoraParams(Section):
    """`finetune.lora`: peft's LoraConfig(r, lora_alpha, lora_dropout, target_modules) on the backbone."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # Linear names in lmforge.model.decoder: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj.
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one Linear module name (e.g. q_proj)")
        return value


class FinetuneParams(TrainingKnobs):
    """`finetune`: task, data fields, method (full | frozen | lora) and the trainer knobs
    (defaults for the built-in classify task on a 2-core CPU); lmforge.finetune.tuning uses them."""

    section: ClassVar[str] = "finetune"

    task: Literal["classify", "sft"] = "classify"
    method: Literal["full", "frozen", "lora"] = "full"
    train_file: str = Field("data/finetune/classify_train.jsonl", min_length=1)
    # Checked against the training labels here; the evaluate stage scores it (so it is required).
    test_file: str = Field("data/finetune/classify_test.jsonl", min_length=1)
    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str = "prompt"
    response_field: str = "response"
    max_length: int = Field(128, ge=2)
    # Classification head input: `last` non-pad token's hidden state, or the `mean` over non-pad tokens.
    pooling: Literal["last", "mean"] = "last"
    # Weight each class by n / (n_labels * count) in the loss (imbalanced label sets).
    class_weights: bool = False
    prompt_separator: str = "\n"
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    early_stopping_metric: Literal["val_loss", "val_accuracy"] = "val_loss"
    patience: int = Field(0, ge=0)  # evals without improvement before stopping; 0: never stop early
    lora: LoraParams = LoraParams()

    max_steps: int = Field(120, gt=0)
    micro_batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    eval_every: int = Field(20, ge=0)
    eval_batches: int = Field(50, gt=0)

    @model_validator(mode="after")
    def _task_fits_method(self) -> FinetuneParams:
        if self.task == "sft" and self.method == "frozen":
            raise ValueError(
                "finetune.method 'frozen' trains only a new classification head, and sft has none: "
                "use 'lora' or 'full'"
            )
        if self.task == "sft" and self.early_stopping_metric == "val_accuracy":
            raise ValueError("finetune.early_stopping_metric 'val_accuracy' is for task classify: use 'val_loss'")
        return self

    @property
    def early_stopping_mode(self) -> Literal["min", "max"]:
        """Whether lower (loss) or higher (accuracy) is better for early_stopping_metric."""
        return "max" if self.early_stopping_metric == "val_accuracy" else "min"


class TasksParams(Section):
    """`finetune_data`: the built-in fine-tuning tasks made from the built-in corpus."""

    classify_top_k: int = Field(8, ge=2)  # classes: the K packages with most training docstrings
    classify_max_per_class: int = Field(300, gt=0)  # training rows per class at most (balance)
    sft_max_prompt_chars: int = Field(300, gt=0)
    sft_max_response_chars: int = Field(200, gt=0)
    seed: int = 0


class EvaluateParams(Section):
    """`evaluate`: how much held-out data each figure uses."""

    lm_max_rows: int | None = Field(512, gt=0)  # val rows for the perplexities (None: all)
    sft_max_examples: int = Field(200, gt=0)  # test pairs generated for the SFT figures
    sft_max_new_tokens: int = Field(32, gt=0)
    report_examples: int = Field(10, ge=0)  # generated responses shown in report.md


# What the promote stage may compare on, per task: reports/metrics.json's keys. Loss-like figures
# improve downwards; every other one upwards.
CLASSIFY_METRICS = ("accuracy", "macro_f1", "weighted_f1")
SFT_METRICS = ("sft_exact_match", "sft_token_f1", "sft_rouge_l", "sft_loss", "sft_perplexity")
LOWER_IS_BETTER = frozenset({"sft_loss", "sft_perplexity"})


class PromoteMetricParams(Section):
    """`promote.metric`: the figure of each task the challenger must beat the champion on (one per
    task, so switching finetune.task needs no second edit)."""

    classify: Literal[CLASSIFY_METRICS] = "macro_f1"  # type: ignore[valid-type]
    sft: Literal[SFT_METRICS] = "sft_rouge_l"  # type: ignore[valid-type]


class PromoteParams(Section):
    """`promote`: when the new fine-tuned model (challenger) replaces the one in use (champion)."""

    metric: PromoteMetricParams = PromoteMetricParams()
    # The challenger must beat the champion by at least this much (in the metric's units, in the
    # better direction): a tie or noise-sized gain keeps the champion.
    min_delta: float = Field(0.01, ge=0)

    def metric_for(self, task: str) -> str:
        return getattr(self.metric, task)


class GenerateParams(Section):
    """`evaluate`: sampling for the pretrained model's samples in reports/ (samples.json, report.md)."""

    prompts: list[str] = Field(["The function returns", "This module provides", "Return a new"], min_length=1)

    @field_validator("prompts")
    @classmethod
    def _prompts_have_text(cls, value: list[str]) -> list[str]:
        if any(not prompt.strip() for prompt in value):
            raise ValueError("every prompt needs some text (an empty prompt has no token to continue)")
        return value
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(0.8, ge=0)  # 0 is greedy
    top_k: int | None = Field(50, gt=0)
    top_p: float | None = Field(0.95, gt=0, le=1)
    seed: int = 0


class Params(BaseModel):
    """The whole params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    data: DataParams = DataParams()
    engine: EngineParams = EngineParams()
    clean: CleanParams = CleanParams()
    tokenizer: TokenizerParams = TokenizerParams()
    model: ModelParams = ModelParams()
    pretrain: PretrainParams = PretrainParams()
    finetune: FinetuneParams = FinetuneParams()
    generate: GenerateParams = GenerateParams()
    tasks: TasksParams = TasksParams()
    evaluate: EvaluateParams = EvaluateParams()
    promote: PromoteParams = PromoteParams()
    runtime: RuntimeParams = RuntimeParams()

    def trainer(self, stage: Literal["pretrain", "finetune"]) -> TrainerParams:
        """What the trainer reads for `stage`: its section's training knobs and `runtime.<stage>`."""
        knobs, runtime = getattr(self, stage), getattr(self.runtime, stage)
        return TrainerParams(**{name: getattr(knobs, name) for name in TrainingKnobs.model_fields},
                             **{name: getattr(runtime, name) for name in TrainingRuntime.model_fields})

    @model_validator(mode="after")
    def _fits_the_context(self) -> Params:
        """Checks across sections that would otherwise fail only after training: everything the
        model reads or writes must fit its context, tokenizer.seq_len."""
        context = self.tokenizer.seq_len
        for key, new_tokens in (("generate.max_new_tokens", self.generate.max_new_tokens),
                                ("evaluate.sft_max_new_tokens", self.evaluate.sft_max_new_tokens)):
            if new_tokens >= context:
                raise ValueError(f"{key} {new_tokens} leaves no room for a prompt in the model's context "
                                 f"(tokenizer.seq_len {context}): lower it below {context}")
        limit = context + (1 if self.finetune.task == "sft" else 0)  # sft rows hold inputs + 1 shifted target
        if self.finetune.max_length > limit:
            raise ValueError(f"finetune.max_length {self.finetune.max_length} exceeds what the model reads "
                             f"({limit} tokens for {self.finetune.task}, from tokenizer.seq_len): lower it")
        return self


def _section_keys(model: type[BaseModel], prefix: str = "") -> dict[type[BaseModel], str]:
    """Each section class -> its dotted place in params.yaml (every class sits in one place)."""
    keys: dict[type[BaseModel], str] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            assert annotation not in keys, f"{annotation.__name__} sits in two places of params.yaml"
            keys[annotation] = f"{prefix}{name}"
            keys |= _section_keys(annotation, f"{prefix}{name}.")
    return keys


_SECTION_KEYS = _section_keys(Params)


def write_trace(stage: str) -> None:
    """Append the params keys this process read to the file TRACE_ENV names (when set): one JSON line
    {"stage", "keys"}, written in one append (several ranks may share the file)."""
    path = os.environ.get(TRACE_ENV)
    if path and _read_keys is not None:
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps({"stage": stage, "keys": sorted(_read_keys)}) + "\n")


def _format_error(error: dict[str, Any], model: type[BaseModel]) -> str:
    key = ".".join(_short(str(part)) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, error["loc"][:-1])
        return f"unknown key '{key}'" + (f" (allowed here: {', '.join(allowed)})" if allowed else "")
    # A validator's own message may quote the value (e.g. `unknown preset ...`).
    message = _short(error["msg"].removeprefix("Value error, "), 2 * MAX_QUOTED_CHARS)
    if not key:  # a check across sections: its message names the keys
        return message
    got = error.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {_QUOTE.repr(got)})"
    return f"{key}: {message}{got_text}"


def _short(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


# repr of a value, bounded whatever its size (reprlib cuts strings, lists and nesting before repr).
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxtuple, _QUOTE.maxdict = 2, 5, 5, 4
_QUOTE.maxstring = _QUOTE.maxlong = _QUOTE.maxother = MAX_QUOTED_CHARS


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def parse_params(raw: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a params mapping; errors name every bad key at once (the first MAX_LISTED_ERRORS)."""
    global _read_keys
    tracing, _read_keys = _read_keys, None  # what the validators read is the loader's, not the stage's
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        lines = [_format_error(err, Params) for err in errors[:MAX_LISTED_ERRORS]]
        if len(errors) > MAX_LISTED_ERRORS:
            lines.append(f"... and {len(errors) - MAX_LISTED_ERRORS:,} more")
        if len(lines) == 1:  # the common case reads as one line
            raise LmforgeError(f"{source} is invalid: {lines[0]}") from None
        raise LmforgeError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None
    finally:
        _read_keys = tracing


def load_params(path: str | Path = DEFAULT_PARAMS_PATH) -> Params:
    """Read and validate params.yaml (DVC edits this file for `dvc exp run -S`). With TRACE_ENV set,
    the keys the process reads from here on are recorded (write_trace appends them)."""
    global _read_keys
    if os.environ.get(TRACE_ENV) and _read_keys is None:
        _read_keys = set()
    path = Path(path)
    raw = read_params_yaml(path)
    if raw is not None and not isinstance(raw, dict):
        raise LmforgeError(f"{path} must be a mapping of sections (data, clean, tokenizer, ...)")
    return parse_params(raw, str(path))


def read_params_yaml(path: Path) -> Any:
    """The YAML document in `path`, bounded: at most MAX_PARAMS_BYTES, and MAX_PARAMS_VALUES once
    its aliases are expanded (counted on the composed nodes, before anything is built from them);
    otherwise one LmforgeError naming the file. Also for the flow, before DVC reads the file."""
    if not path.is_file():
        raise LmforgeError(f"{path} not found: run from the repository root, where params.yaml lives")
    with path.open("rb") as file:
        data = file.read(MAX_PARAMS_BYTES + 1)
    if len(data) > MAX_PARAMS_BYTES:
        raise LmforgeError(f"{path} is larger than {MAX_PARAMS_BYTES:,} bytes, not a params file (they are a few "
                           "KB): check that it is the file you meant")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LmforgeError(f"{path} is not UTF-8 text (byte {exc.start:,}): save it as UTF-8") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if not _within_values(node, MAX_PARAMS_VALUES):
            raise LmforgeError(
                f"{path} holds more than {MAX_PARAMS_VALUES:,} values once its YAML aliases (*name) are expanded, "
                "or an alias inside itself: a params file holds a few hundred; write the values out instead")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise LmforgeError(f"{path} is not valid YAML: {_short(str(exc), 3 * MAX_QUOTED_CHARS)}") from None
    except RecursionError:  # PyYAML composes nested lists and mappings recursively
        raise LmforgeError(f"{path} nests lists or mappings too deeply to be params: fix its brackets") from None
    finally:
        loader.dispose()


def _within_values(root: yaml.Node, limit: int) -> bool:
    """Whether `root` holds at most `limit` values with every alias expanded (a node an alias shares
    counts each time it appears), and no alias inside itself (an endless expansion). A walk over
    the distinct nodes, each one's expanded size remembered: as fast as the file is small."""
    sizes: dict[int, int] = {}
    ancestors: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = _children(node)
        if children_done:
            ancestors.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > limit:
                return False
        elif id(node) in ancestors:
            return False
        elif id(node) not in sizes:
            ancestors.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children)
    return True


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
