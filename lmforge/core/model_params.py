"""The model stages' params sections (pretrain, finetune, evaluate, promote, the samples) and `runtime`.

A stage's section holds only what changes its result; how it runs (checkpoints, progress bars,
processes, compile) is in `runtime`, which no stage lists in dvc.yaml. Every field's `description`
is the one text about it: docs/reference/params.md is generated from it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from lmforge.core.presets import PRESETS
from lmforge.core.section import Section


class ModelParams(Section):
    """`model`: the decoder's shape, a preset with optional overrides. vocab_size and max_seq_len come
    from the tokenizer (vocab size, seq_len)."""

    preset: str = Field("small", description="`tiny` | `small` (4 layers, dim 256) | `124m` | `350m` | `1b` "
                                             "(lmforge/core/presets.py); the keys below override it")
    dim: int | None = Field(None, gt=0, description="model width; null: the preset's")
    n_layers: int | None = Field(None, gt=0, description="transformer blocks; null: the preset's")
    n_heads: int | None = Field(None, gt=0, description="attention heads; null: the preset's")
    n_kv_heads: int | None = Field(None, gt=0, description="key/value heads (< n_heads: grouped-query attention); "
                                                           "null: the preset's")
    ffn_dim_multiplier: float | None = Field(None, gt=0, description="scales the feed-forward width; null: the preset's")
    multiple_of: int | None = Field(None, gt=0, description="the feed-forward width is rounded up to a multiple of "
                                                            "this; null: the preset's")
    rope_theta: float | None = Field(None, gt=0, description="rotary embedding base; null: the preset's")
    norm_eps: float | None = Field(None, gt=0, description="RMSNorm epsilon; null: the preset's")
    tie_embeddings: bool | None = Field(None, description="share the input embedding and output head; null: the preset's")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}: choose one of {', '.join(PRESETS)}")
        return value

    def overrides(self) -> dict[str, Any]:
        """The fields set here, to pass to lmforge.model.decoder.build_config(preset, **overrides)."""
        # Read field by field (not model_dump): a traced run records each key it reads.
        values = {name: getattr(self, name) for name in type(self).model_fields if name != "preset"}
        return {name: value for name, value in values.items() if value is not None}


class TrainingKnobs(Section):
    """The knobs of the one training loop that change what it computes, shared by `pretrain` and
    `finetune`: declared once, here, with pretraining's default; `finetune` redeclares only the
    defaults that differ. params.yaml states the same values (tests/test_trainer.py holds them equal)."""

    section: ClassVar[str] = "trainer"

    max_steps: int = Field(240, gt=0, description="optimizer steps")
    max_tokens: int | None = Field(None, gt=0, description="optional token budget: training stops at whichever of "
                                                           "max_steps and max_tokens comes first")
    micro_batch_size: int = Field(16, gt=0, description="rows per micro-step per process")
    grad_accum_steps: int = Field(1, gt=0, description="micro-steps per optimizer step (gradients sync on the last)")
    lr: float = Field(2e-3, gt=0, description="peak learning rate, after linear warmup")
    min_lr: float = Field(2e-4, ge=0, description="learning rate the cosine decay ends at")
    warmup_steps: int = Field(24, ge=0, description="steps of linear warmup")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices and embeddings only)")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2")
    grad_clip: float = Field(1.0, ge=0, description="clip gradients to this global norm (0: off)")
    precision: Literal["bf16", "fp16", "fp32", "fp8"] = Field(
        "fp32", description="`fp32` | `bf16` | `fp16` (autocast; fp16 adds a grad scaler) | `fp8` (pretrain only, "
                            "GPUs of compute capability >= 8.9: the blocks' linear layers in float8, the rest "
                            "bf16). bf16 on GPUs")
    eval_every: int = Field(40, ge=0, description="steps between validations (0: only at the end)")
    eval_batches: int = Field(8, gt=0, description="validation batches per evaluation")
    seed: int = Field(1337, description="seed of initialization and data order")

    @model_validator(mode="after")
    def _min_lr_below_lr(self) -> TrainingKnobs:
        if self.min_lr > self.lr:
            raise ValueError(f"{self.section}.min_lr {self.min_lr} is above {self.section}.lr {self.lr}")
        return self


def _knob(name: str, default: Any, **bounds: Any) -> Any:
    """`finetune`'s own default of a TrainingKnobs field, its description kept."""
    return Field(default, **bounds, description=TrainingKnobs.model_fields[name].description)


class TrainingRuntime(Section):
    """`runtime.finetune` (and the base of `runtime.pretrain`): how a training run executes, never what
    it computes (a resumed run gives what an uninterrupted one would)."""

    checkpoint_every: int = Field(40, ge=0, description="steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = Field(2, gt=0, description="checkpoints kept on disk (the newest)")
    resume: Literal["auto", "never"] = Field(
        "auto", description="`auto`: continue from the last checkpoint of the same run | `never`: start fresh")
    progress: bool = Field(True, description="show a progress bar (on a terminal only: a log gets the evaluation lines)")


class TrainerParams(TrainingKnobs, TrainingRuntime):
    """What lmforge.train.trainer.Trainer reads: a stage's training knobs and its run-time knobs
    together (Params.trainer builds it from params.yaml; tests and benchmarks build it directly)."""


class PretrainParams(TrainingKnobs):
    """`pretrain` (stage pretrain -> models/pretrain, models/pretrain_hf, reports/pretrain/)."""

    section: ClassVar[str] = "pretrain"

    document_mask: bool = Field(False, description="attention within each packed document only; rotary positions "
                                                   "restart per document")
    # Layout knobs that change the numbers a run computes (the order of sums; bf16 rounding of
    # gradients), so DVC params; nproc (how many processes) stays a run-time knob.
    tensor_parallel: int = Field(1, ge=1, description="tensor-parallel degree N: each block's projections split "
                                                      "over N processes (heads/N each), FSDP2 over the other "
                                                      "nproc/N; N divides nproc, n_heads and n_kv_heads")
    reduce_precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="dtype gradients are reduce-scattered in across processes: `bf16` sends half the "
                            "bytes; master weights and the optimizer stay fp32")
    fp8_recipe: Literal["tensorwise", "rowwise"] = Field(
        "tensorwise", description="precision fp8 only: torchao's float8 scaling, one scale per tensor "
                                  "(`tensorwise`: fastest, weights all-gathered in float8 under FSDP2) or per "
                                  "row (`rowwise`: more accurate)")

    @model_validator(mode="after")
    def _fp8_without_tensor_parallel(self) -> PretrainParams:
        # torchao's float8 tensor-parallel styles are not wired into lmforge.train.distributed.apply_tp:
        # refused at load rather than run untested. (The GPU check is the stage's: params load anywhere.)
        if self.precision == "fp8" and self.tensor_parallel > 1:
            raise ValueError(f"pretrain.precision fp8 with pretrain.tensor_parallel {self.tensor_parallel} is not "
                             "supported: use tensor_parallel 1 (FSDP2 shards over every process) or precision bf16")
        return self


class PretrainRuntime(TrainingRuntime):
    """`runtime.pretrain`: checkpoints, progress, and how the computation is laid out on the hardware."""

    nproc: int = Field(1, ge=1, description="processes (GPUs) on this machine; > 1 runs the stage under "
                                            "torch.distributed.run (FSDP2)")
    # How many machines, not what they compute: ranks are the same processes at any nnodes x nproc,
    # so this sits beside nproc, outside the DVC params (lmforge.train.launch reads both).
    nnodes: int = Field(1, ge=1, description="machines; > 1: this one is the head, the others join it "
                                             "(LMFORGE_RDZV_ENDPOINT=HOST:PORT; docs/guides/scaling-out.md)")
    join_timeout_s: int = Field(600, ge=1, description="nnodes > 1: seconds the head waits for every node "
                                                       "to join (and a node for the head) before it fails")
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="`none` | `full`: recompute each block's activations in backward (least memory, most "
                            "compute) | `selective`: keep matmul and attention outputs, recompute the rest")

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _ac_from_bool(cls, value: Any) -> Any:
        # Before `selective` existed this was a bool: true (full) and false (none) still read.
        return {True: "full", False: "none"}.get(value, value) if isinstance(value, bool) else value
    compile: bool = Field(False, description="torch.compile each block")
    loss_chunk_tokens: int = Field(0, ge=0, description="> 0: cross-entropy this many tokens at a time, never the "
                                                        "whole logits tensor (big vocabularies)")
    async_checkpoint: bool = Field(False, description="write checkpoints in a background thread from a staged CPU copy")


class LoraParams(Section):
    """`finetune.lora`: peft's LoraConfig(r, lora_alpha, lora_dropout, target_modules) on the backbone."""

    # First: in params.yaml anything after a list's last item (a comment, a blank line) is lost
    # when DVC's editor rewrites the file (lmforge/core/params_yaml.py).
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], description=(
        "Linear layers adapted: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj"))
    r: int = Field(8, gt=0, description="rank of the adapters")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapters' input")

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("list at least one Linear module name (e.g. q_proj)")
        return value


class FinetuneParams(TrainingKnobs):
    """`finetune` (stage finetune -> models/finetune, reports/finetune/): task, data fields, method and the
    trainer knobs (defaults for the built-in classify task on a 2-core CPU)."""

    section: ClassVar[str] = "finetune"

    task: Literal["classify", "sft"] = Field(
        "classify", description="`classify` (a head on the decoder) | `sft` (prompt -> response, loss on the response)")
    method: Literal["full", "frozen", "lora"] = Field(
        "full", description="`full` | `frozen` (backbone frozen, head only) | `lora` (peft adapters, merged for export)")
    train_file: str = Field("data/finetune/classify_train.jsonl", min_length=1,
                            description="training examples: .jsonl, .parquet or .csv")
    test_file: str = Field("data/finetune/classify_test.jsonl", min_length=1,
                           description="test examples, scored by evaluate (finetune checks its labels)")
    text_field: str = Field("text", description="classify: the column holding the text")
    label_field: str = Field("label", description="classify: the column holding the label")
    prompt_field: str = Field("prompt", description="sft: the column holding the prompt")
    response_field: str = Field("response", description="sft: the column holding the response")
    max_length: int = Field(128, ge=2, description="tokens per example (longer ones are truncated)")
    # `mean_embed` with label_smoothing 0.2 by measurement: on the default task 0.858 validation accuracy
    # against `mean`'s 0.838 and `last`'s 0.804 (docs/guides/experiments.md, the recipe sweep).
    pooling: Literal["last", "mean", "mean_embed"] = Field(
        "mean_embed", description="classify head input: the `mean` over non-pad tokens' hidden states | the `last` "
                                  "non-pad token's | `mean_embed`: the mean, and beside it the mean of the input token "
                                  "embeddings")
    class_weights: bool = Field(False, description="weight each class by n / (n_labels * count) in the loss")
    label_smoothing: float = Field(0.2, ge=0.0, lt=1.0, description="classify: the loss's target puts this much "
                                                                     "probability spread over every class")
    prompt_separator: str = Field("\n", description="sft: between prompt and response (then the response, then EOS)")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="validation rows carved from train_file by a hash "
                                                                 "of each row's id")
    early_stopping_metric: Literal["val_loss", "val_accuracy"] = Field(
        "val_loss", description="what picks the best weights: `val_loss` | `val_accuracy` (classify)")
    patience: int = Field(0, ge=0, description="evaluations without improvement before stopping (0: never)")
    lora: LoraParams = Field(LoraParams(), description="the adapters, when method is `lora`")

    # The fine-tuning models (a head on the decoder, peft's adapters) are not converted to float8,
    # and at fine-tuning's sizes float8 would gain little: fp8 is refused at load, not run as bf16.
    precision: Literal["bf16", "fp16", "fp32"] = _knob("precision", "fp32")

    @field_validator("precision", mode="before")
    @classmethod
    def _no_fp8(cls, value: Any) -> Any:
        if value == "fp8":
            raise ValueError("fp8 trains the pretrain stage only (pretrain.precision: fp8): use bf16")
        return value

    max_steps: int = _knob("max_steps", 120, gt=0)
    micro_batch_size: int = _knob("micro_batch_size", 32, gt=0)
    lr: float = _knob("lr", 1e-3, gt=0)
    min_lr: float = _knob("min_lr", 1e-4, ge=0)
    warmup_steps: int = _knob("warmup_steps", 10, ge=0)
    weight_decay: float = _knob("weight_decay", 0.01, ge=0)
    eval_every: int = _knob("eval_every", 20, ge=0)
    eval_batches: int = _knob("eval_batches", 50, gt=0)

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


class GenerateParams(Section):
    """`generate` (stage evaluate): sampling for the pretrained model's samples (reports/samples.json, report.md)."""

    prompts: list[str] = Field(["The function returns", "This module provides", "Return a new"], min_length=1,
                               description="texts the pretrained model continues")
    max_new_tokens: int = Field(48, gt=0, description="tokens generated per prompt")
    temperature: float = Field(0.8, ge=0, description="softmax temperature (0: greedy)")
    top_k: int | None = Field(50, gt=0, description="sample among the k likeliest tokens; null: all")
    top_p: float | None = Field(0.95, gt=0, le=1, description="sample among the likeliest tokens holding this much "
                                                              "probability; null: all")
    seed: int = Field(0, description="seed of the sampling (and of evaluate's SFT generation)")

    @field_validator("prompts")
    @classmethod
    def _prompts_have_text(cls, value: list[str]) -> list[str]:
        if any(not prompt.strip() for prompt in value):
            raise ValueError("every prompt needs some text (an empty prompt has no token to continue)")
        return value


class HarnessParams(Section):
    """`evaluate.harness`: EleutherAI's lm-evaluation-harness on the exported Hugging Face models
    (models/pretrain_hf; an SFT model too) -> reports/harness.json. Needs `pip install 'lmforge[eval]'`;
    without it evaluate says so and finishes."""

    tasks: list[str] = Field(["lmforge_cloze", "lmforge_continuation"],
                             description="harness task names: the shipped offline tasks built from held-out documents "
                                         "(lmforge/evaluate/tasks/), or any installed task whose data loads, e.g. "
                                         "hellaswag; []: no harness")
    limit: int | None = Field(200, gt=0, description="examples scored per task (the first ones); null: all")
    num_fewshot: int = Field(0, ge=0, description="solved examples put before each question")
    # Padding differs with the batch, which moves a score in its last digits: a result knob.
    batch_size: int = Field(16, gt=0, description="requests per forward pass")


class EvaluateParams(Section):
    """`evaluate` (stage evaluate -> reports/): how much held-out data each figure uses, and what pretraining
    bought: the finetune recipe rerun from random weights (and on fewer labels), scored on the same test set."""

    scratch_baseline: bool = Field(
        True, description="also fine-tune the same recipe (finetune.*) from randomly initialised weights and score it: "
                          "pretraining_gain in metrics.json; costs one more fine-tune (~105 s on the default run)")
    label_efficiency: bool = Field(
        False, description="compare the pretrained and the from-scratch fine-tunes and the bag of words at each of "
                           "label_efficiency_sizes training examples (and at all); two fine-tunes per size, each "
                           "as long as the headline's (needs scratch_baseline)")
    label_efficiency_sizes: list[int] = Field([64, 256, 1024], min_length=1, description="the training-set sizes")
    lm_max_rows: int | None = Field(512, gt=0, description="val rows for the perplexities; null: all")
    sft_max_examples: int = Field(200, gt=0, description="test pairs generated (greedy) for the SFT figures")
    sft_max_new_tokens: int = Field(32, gt=0, description="tokens generated per SFT answer")
    report_examples: int = Field(10, ge=0, description="generated SFT responses shown in report.md")
    harness: HarnessParams = Field(HarnessParams(), description="standard benchmarks on the exported models")
    quantize: Literal["int8_weight_only", "int8_dynamic"] = Field(
        "int8_weight_only", description="the pretrained model quantized to models/pretrain_int8 and scored beside it: "
                                        "`int8_weight_only` | `int8_dynamic` (int8 activations too)")
    int8_max_perplexity_increase: float = Field(0.02, ge=0, description="relative perplexity rise of the int8 "
                                                                       "model the report flags above (0.02: 2 %)")

    @field_validator("label_efficiency_sizes")
    @classmethod
    def _sizes_are_counts(cls, value: list[int]) -> list[int]:
        if any(size <= 0 for size in value):
            raise ValueError(f"every size must be a positive number of training examples (got {value})")
        return sorted(set(value))

    @model_validator(mode="after")
    def _label_efficiency_needs_the_scratch_baseline(self) -> EvaluateParams:
        # Its "all" row is the headline's two fine-tunes: without the scratch one it has no column to compare.
        if self.label_efficiency and not self.scratch_baseline:
            raise ValueError("evaluate.label_efficiency compares against the from-scratch fine-tune: set "
                             "evaluate.scratch_baseline to true, or label_efficiency to false")
        return self


class EvaluateRuntime(Section):
    """`runtime.evaluate`: how evaluate batches its work (the figures do not depend on it)."""

    lm_micro_batch_size: int = Field(16, gt=0, description="val rows per forward pass for the perplexities")


class RuntimeParams(Section):
    """`runtime`: knobs that change how stages run, never what they produce. No stage lists this
    section in dvc.yaml, so changing one reruns nothing."""

    pretrain: PretrainRuntime = Field(PretrainRuntime(), description="how pretrain runs")
    finetune: TrainingRuntime = Field(TrainingRuntime(), description="how finetune runs")
    evaluate: EvaluateRuntime = Field(EvaluateRuntime(), description="how evaluate runs")


# What the promote stage may compare on, per task: reports/metrics.json's keys. Loss-like figures
# improve downwards; every other one upwards.
CLASSIFY_METRICS = ("accuracy", "macro_f1", "weighted_f1")
SFT_METRICS = ("sft_exact_match", "sft_token_f1", "sft_rouge_l", "sft_loss", "sft_perplexity")
LOWER_IS_BETTER = frozenset({"sft_loss", "sft_perplexity"})


class PromoteMetricParams(Section):
    """`promote.metric`: the figure of each task the challenger must beat the champion on (one per
    task, so switching finetune.task needs no second edit)."""

    classify: Literal[CLASSIFY_METRICS] = Field(  # type: ignore[valid-type]
        "macro_f1", description="`accuracy` | `macro_f1` | `weighted_f1` (higher is better)")
    sft: Literal[SFT_METRICS] = Field(  # type: ignore[valid-type]
        "sft_rouge_l", description="`sft_exact_match` | `sft_token_f1` | `sft_rouge_l` (higher is better) | "
                                   "`sft_loss` | `sft_perplexity` (lower is better)")


class PromoteParams(Section):
    """`promote` (stage promote -> reports/promotion.json): when the new fine-tuned model (challenger)
    replaces the one in use (champion, a registry alias)."""

    metric: PromoteMetricParams = Field(PromoteMetricParams(), description="the figure compared, per task")
    min_delta: float = Field(0.01, ge=0, description="least improvement that promotes, in the metric's units; less "
                                                     "keeps the champion (a tie or noise-sized gain)")

    def metric_for(self, task: str) -> str:
        return getattr(self.metric, task)
