"""What pretraining bought: the finetune stage's own recipe (lmforge.finetune.recipe, the one trainer) run
again in memory from randomly initialised weights, and on subsets of its training examples, each model
scored on the test set as evaluate scores the fine-tuned one. One process, no checkpoints, no tracking.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.core import paths
from lmforge.core.params import LOWER_IS_BETTER, Params
from lmforge.data.tokens.tokenizer import load_tokenizer
from lmforge.evaluate.metrics import bag_of_words_baseline, model_scores, score_classifier, score_sft
from lmforge.finetune import recipe
from lmforge.finetune.examples import read_examples
from lmforge.finetune.inference import FinetunedModel
from lmforge.finetune.methods import merged_model
from lmforge.train.distributed import DistInfo

log = logging.getLogger("lmforge.evaluate.gain")

# The figures whose gain is reported, per task: the fine-tuned model's headline ones (perplexity
# says what sft_loss says).
GAIN_FIGURES = {"classify": ("accuracy", "macro_f1"),
                "sft": ("sft_exact_match", "sft_token_f1", "sft_rouge_l", "sft_loss")}


@dataclass
class PretrainingGain:
    """The from-scratch model's test report, the gain per figure, and the label-efficiency rows
    ({"train_examples", "pretrained", "scratch", "bag of words"}: each a report or None)."""

    scratch: dict[str, Any]
    gain: dict[str, float]
    label_efficiency: list[dict[str, Any]] = field(default_factory=list)


def pretraining_gain(task: str, pretrained: Mapping[str, Any], scratch: Mapping[str, Any]) -> dict[str, float]:
    """How much better the pretrained fine-tune is than the same recipe from scratch, per figure:
    pretrained - scratch (scratch - pretrained for a loss), so a positive number is what pretraining bought."""
    ours, theirs = model_scores(task, pretrained), model_scores(task, scratch)
    return {key: (theirs[key] - ours[key]) if key in LOWER_IS_BETTER else (ours[key] - theirs[key])
            for key in GAIN_FIGURES[task] if key in ours and key in theirs}


def subset(n_rows: int, size: int, seed: int) -> list[int]:
    """`size` of the row indices 0..n_rows-1, drawn by `seed`, in index order; nested (a smaller
    size's rows are among a larger one's), so the sizes differ only in how many labels they see."""
    order = np.random.default_rng(seed).permutation(n_rows)
    return sorted(order[:size].tolist())


def one_process_recipe(params: Params, world_size: int) -> Params:
    """`params` whose one process takes the steps finetune took over `world_size` processes: the same
    rows per step (micro-steps x world_size) and the same validation rows (eval_batches x world_size)."""
    fp = params.finetune
    if world_size == 1:
        return params
    return params.model_copy(update={"finetune": fp.model_copy(update={
        "grad_accum_steps": fp.grad_accum_steps * world_size, "eval_batches": fp.eval_batches * world_size})})


def finetune_world_size() -> int:
    """How many processes the finetune stage ran on (reports/finetune/stats.json; 1 when unknown)."""
    stats = paths.FINETUNE_REPORTS / "stats.json"
    return int(json.loads(stats.read_text(encoding="utf-8")).get("world_size") or 1) if stats.is_file() else 1


def fine_tune(params: Params, from_scratch: bool, rows: list[int] | None = None) -> FinetunedModel:
    """The finetune stage's training, step for step (same seed, head initialisation, data order,
    trainer, early stopping), from models/pretrain's weights or from random ones, on every training
    example or on `rows` of them; the best weights, on the CPU, ready to score."""
    fp = params.finetune
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")  # as finetune's device
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_main=True)
    torch.manual_seed(fp.seed)  # as stages.finetune, before the backbone is built: the same head either way
    setup = recipe.prepare(params, from_scratch=from_scratch)
    if rows is not None:
        setup = replace(setup, data={**setup.data, "train": [setup.data["train"][i] for i in rows]})
    model, _ = recipe.build_model_to_train(fp, setup, info)
    recipe.build_trainer(model, params, setup, info, on_metrics=None, checkpoint_dir=None).fit()
    return FinetunedModel(merged_model(model).cpu(), setup.config, recipe.model_meta(params, setup),
                          load_tokenizer(setup.tokenizer_path))


def scored_rows(params: Params) -> list[dict[str, Any]]:
    """The test examples evaluate scores (SFT: the first sft_max_examples)."""
    ft = params.finetune
    rows = read_examples(Path(ft.test_file), ft, ft.task)
    return rows if ft.task == "classify" else rows[: params.evaluate.sft_max_examples]


def score(params: Params, model: FinetunedModel, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The test report evaluate gives the fine-tuned model (classification_report, or the SFT figures)."""
    if params.finetune.task == "classify":
        return score_classifier(model, [r["text"] for r in rows], [r["label"] for r in rows])
    report, _ = score_sft(model, [r["prompt"] for r in rows], [r["response"] for r in rows],
                          params.evaluate.sft_max_new_tokens, params.generate.seed)
    return report


def label_efficiency(params: Params, test: list[dict[str, Any]], labels: list[str] | None,
                     every: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluate.label_efficiency_sizes below the training split's size: the pretrained and
    the from-scratch fine-tunes and (classify) the bag of words, each trained on the same subset (the
    same validation rows pick the fine-tunes' best weights); then `every`, the headline's figures, as
    the row of all the training examples."""
    fp = params.finetune
    train, _ = recipe.train_val_rows(fp)
    out = []
    for size in params.evaluate.label_efficiency_sizes:
        if size >= len(train):
            log.info("label efficiency: %d examples is all of the %d in the training split (the last row)", size, len(train))
            continue
        rows = subset(len(train), size, fp.seed)
        row: dict[str, Any] = {"train_examples": size}
        for name, from_scratch in (("pretrained", False), ("scratch", True)):
            log.info("label efficiency: fine-tuning %s on %d examples", "from scratch" if from_scratch else name, size)
            row[name] = score(params, fine_tune(params, from_scratch, rows), test)
        row["bag of words"] = None
        if fp.task == "classify":
            texts, truth = [train[i]["text"] for i in rows], [train[i]["label"] for i in rows]
            if len(set(truth)) > 1:  # one label alone: nothing for a classifier to fit
                row["bag of words"] = bag_of_words_baseline(texts, truth, [r["text"] for r in test],
                                                            [r["label"] for r in test], seed=fp.seed, labels=labels)
        out.append(row)
    return out + [{"train_examples": len(train), **every}]


def measure(params: Params, pretrained: dict[str, Any], bag_of_words: dict[str, Any] | None,
            labels: list[str] | None) -> PretrainingGain | None:
    """evaluate.scratch_baseline's run and the gain over it, then label_efficiency's rows; None when off.
    `pretrained`: the fine-tuned model's test report; `bag_of_words`: the headline's baseline (classify)."""
    if not params.evaluate.scratch_baseline:
        return None
    task, test = params.finetune.task, scored_rows(params)
    params = one_process_recipe(params, finetune_world_size())
    log.info("scratch baseline: fine-tuning the same recipe from randomly initialised weights (%d steps)",
             params.finetune.max_steps)
    scratch = score(params, fine_tune(params, from_scratch=True), test)
    gain = pretraining_gain(task, pretrained, scratch)
    log.info("pretraining gain: %s", ", ".join(f"{key} {value:+.4f}" for key, value in gain.items()))
    every = {"pretrained": pretrained, "scratch": scratch, "bag of words": bag_of_words}
    rows = label_efficiency(params, test, labels, every) if params.evaluate.label_efficiency else []
    return PretrainingGain(scratch, gain, rows)
