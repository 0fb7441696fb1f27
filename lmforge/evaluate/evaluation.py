"""What the evaluate stage measures: the language models' loss beside the unigram floor and the loss
pretraining started from, the fine-tuned model on its task's test set beside the same recipe from
scratch and baselines (classify) or references (sft), samples of the pretrained model, metrics.json's
headline and report.md's provenance table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lmforge.core import paths
from lmforge.core.io import write_json
from lmforge.core.params import Params
from lmforge.core.verdict import WARNING_TAG, majority_warning
from lmforge.data.tokens.shards import ShardReader, read_shards_manifest, val_sources
from lmforge.evaluate.metrics import (
    bag_of_words_baseline, language_model_loss, majority_baseline, model_scores, score_classifier, score_sft,
)
from lmforge.train.validation import perplexity
from lmforge.evaluate.report import (
    FIRST_STEP, PRETRAINED, UNIGRAM, plot_confusion_matrix, plot_label_efficiency, write_confusion_json,
    write_label_efficiency_csv, write_per_class_csv,
)
from lmforge.finetune.examples import check_labels, read_examples
from lmforge.model.decoder import Transformer
from lmforge.model.generate import sample_prompts
from lmforge.train.curves import first_train_loss, unigram_entropy
from lmforge.train.resume import run_record

log = logging.getLogger("lmforge.evaluate")
# The language-model table's row of the pretrained model on one named source's val rows.
SOURCE_ROW = "pretrained, val of source "

BAG_OF_WORDS = "bag of words (tf-idf + logistic regression)"


def evaluate_lm(params: Params, pretrained: Transformer, finetuned: Any) -> dict[str, dict[str, Any]]:
    """Loss/perplexity on the same val rows for each language model, and the unigram floor."""
    val = ShardReader(paths.SHARDS, "val", tokenizer_path=paths.PRETRAINED / "tokenizer.json", verify="size")
    train = ShardReader(paths.SHARDS, "train", verify="size")
    cfg = params.evaluate
    batch = params.runtime.evaluate.lm_micro_batch_size
    results = {PRETRAINED: language_model_loss(pretrained, val, batch, cfg.lm_max_rows)}
    if finetuned is not None and finetuned.task == "sft":
        results["fine-tuned (SFT)"] = language_model_loss(finetuned.model, val, batch, cfg.lm_max_rows)
    for name in val_sources(paths.SHARDS):  # named sources: each one's val rows apart, the same model
        rows = ShardReader(paths.SHARDS, "val", verify="size", source=name)
        if len(rows):  # a source too small for one val row has no loss of its own
            results[SOURCE_ROW + name] = language_model_loss(pretrained, rows, batch, cfg.lm_max_rows)
    entropy = unigram_entropy(train.blocks(), train.vocab_size)
    results[UNIGRAM] = {"loss": entropy, "perplexity": perplexity(entropy), "tokens": train.num_tokens}
    first = first_train_loss(paths.PRETRAIN_REPORTS / "curve.csv")  # pretrain's record: nothing retrained
    if first is not None:
        results[FIRST_STEP] = {"loss": first, "perplexity": perplexity(first), "tokens": None}
    return results


def training_mixture(lm: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]] | None:
    """Named sources: each one's asked weight, realised share, tokens, documents and epochs of the
    train split (the shards manifest's), with its val loss; None for a single pool."""
    sources = read_shards_manifest(paths.SHARDS).get("sources")
    if not sources:
        return None
    return {name: {**figures, "val_loss": lm.get(SOURCE_ROW + name, {}).get("loss")}
            for name, figures in sources["mixture"].items()}


def test_texts(params: Params) -> tuple[list[str], list[str]]:
    """The classify test set's texts and labels, in file order."""
    test = read_examples(Path(params.finetune.test_file), params.finetune, "classify")
    return [r["text"] for r in test], [r["label"] for r in test]


def evaluate_classify(params: Params, finetuned: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    ft = params.finetune
    train = read_examples(Path(ft.train_file), ft, "classify")
    test = read_examples(Path(ft.test_file), ft, "classify")
    texts, truth = [r["text"] for r in test], [r["label"] for r in test]
    check_labels(test, finetuned.labels, "label", ft.test_file)
    report = score_classifier(finetuned, texts, truth)
    train_texts, train_labels = [r["text"] for r in train], [r["label"] for r in train]
    baselines = {  # the headline table's order: the strong baseline first, then the floor
        BAG_OF_WORDS: bag_of_words_baseline(
            train_texts, train_labels, texts, truth, seed=params.finetune.seed, labels=finetuned.labels
        ),
        "majority class": majority_baseline(train_labels, truth, finetuned.labels),
    }
    plot_confusion_matrix(paths.FIGURES / "confusion_matrix.png", report["confusion"], "fine-tuned classifier")
    write_confusion_json(paths.FIGURES / "confusion_matrix.json", report)
    write_per_class_csv(paths.FIGURES / "per_class.csv", report)
    return report, baselines


def evaluate_gain(params: Params, finetuned: Any, report: dict[str, Any],
                  baselines: dict[str, Any] | None) -> Any:
    """What pretraining bought (lmforge.evaluate.gain.PretrainingGain), None when
    evaluate.scratch_baseline is off; label efficiency's table as figures/label_efficiency.{csv,png}."""
    if not params.evaluate.scratch_baseline:
        return None
    from lmforge.evaluate import gain  # here: it imports the trainer, which evaluate needs only for this

    measured = gain.measure(params, report, (baselines or {}).get(BAG_OF_WORDS), finetuned.labels or None)
    if measured.label_efficiency:
        task = params.finetune.task
        write_label_efficiency_csv(paths.FIGURES / "label_efficiency.csv", measured.label_efficiency, task)
        plot_label_efficiency(paths.FIGURES / "label_efficiency.png", measured.label_efficiency, task)
    return measured


def evaluate_sft(params: Params, finetuned: Any) -> tuple[dict[str, Any], list[dict[str, str]]]:
    ft, gen, cfg = params.finetune, params.generate, params.evaluate
    test = read_examples(Path(ft.test_file), ft, "sft")[: cfg.sft_max_examples]
    prompts, refs = [r["prompt"] for r in test], [r["response"] for r in test]
    report, preds = score_sft(finetuned, prompts, refs, cfg.sft_max_new_tokens, gen.seed)
    examples = [{"prompt": p, "response": r, "reference": t} for p, r, t in zip(prompts, preds, refs)]
    write_json(paths.FIGURES / "sft_examples.json", examples)
    return report, examples[: cfg.report_examples]


def pretrained_samples(params: Params, model: Transformer) -> list[dict[str, str]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(paths.PRETRAINED / "tokenizer.json"))
    return sample_prompts(model, tokenizer, params.generate, tokenizer.token_to_id(params.tokenizer.eos_token))


def warn_if_no_better_than_majority(run: Any, classify: dict[str, Any] | None,
                                    baselines: dict[str, Any] | None) -> str | None:
    """The classifier at or below the majority-class baseline: the warning, logged and tagged on the
    evaluate run (WARNING_TAG) for report.md to show too; None otherwise, and for SFT."""
    if classify is None or baselines is None:
        return None
    warning = majority_warning(classify.get("accuracy"), baselines["majority class"].get("accuracy"))
    if warning:
        log.warning("%s", warning)
        run.set_tags({WARNING_TAG: warning})
    return warning


def headline(lm: dict[str, Any], classify: dict[str, Any] | None, baselines: dict[str, Any] | None,
             sft: dict[str, Any] | None, gain: Any = None) -> dict[str, Any]:
    """metrics.json: the model's own figures at top level, the baselines under `baselines` (the
    same recipe from scratch as `scratch_<figure>`), what pretraining bought under `pretraining_gain`."""
    metrics: dict[str, Any] = {
        "val_loss": lm[PRETRAINED]["loss"],
        "perplexity": lm[PRETRAINED]["perplexity"],
    }
    by_source = {name.removeprefix(SOURCE_ROW): r["loss"] for name, r in lm.items() if name.startswith(SOURCE_ROW)}
    if by_source:  # named sources only: the one pool's metrics.json stays as it was
        metrics["val_loss_by_source"] = by_source
    base: dict[str, Any] = {"unigram_entropy": lm[UNIGRAM]["loss"]}
    if FIRST_STEP in lm:
        base["first_step_loss"] = lm[FIRST_STEP]["loss"]
    if classify is not None:
        metrics |= model_scores("classify", classify)
        base["majority_accuracy"] = baselines["majority class"]["accuracy"]
        base["majority_macro_f1"] = baselines["majority class"]["macro_f1"]
        bow = baselines[BAG_OF_WORDS]
        base["bag_of_words_accuracy"], base["bag_of_words_macro_f1"] = bow["accuracy"], bow["macro_f1"]
    if sft is not None:
        metrics |= model_scores("sft", sft)
        if "fine-tuned (SFT)" in lm:
            metrics["sft_val_perplexity"] = lm["fine-tuned (SFT)"]["perplexity"]
    if gain is not None:
        task = "classify" if classify is not None else "sft"
        base |= {f"scratch_{key}": value for key, value in model_scores(task, gain.scratch).items()}
        metrics["pretraining_gain"] = dict(gain.gain)
    return metrics | {"baselines": base}


def provenance(params: Params, commit: str, run: Any, version: str | None) -> dict[str, Any]:
    """What produced these figures: code, runs, model version, recipe (report.md's first table)."""
    def run_of(checkpoints: Path) -> str:
        record = run_record(checkpoints)  # an lmforge before run keys kept the MLflow run id itself
        key = record.get("tracking_key")
        return (run.find_keyed_run(key) if key else None) or record.get("mlflow_run_id") or "not tracked"

    finetune = json.loads((paths.FINETUNE_REPORTS / "metrics.json").read_text()) \
        if (paths.FINETUNE_REPORTS / "metrics.json").is_file() else {}
    pretrain = json.loads((paths.PRETRAIN_REPORTS / "metrics.json").read_text()) \
        if (paths.PRETRAIN_REPORTS / "metrics.json").is_file() else {}
    return {
        "git commit": commit,
        "pretrain": f"preset `{params.model.preset}`, {pretrain.get('steps', '?')} steps, MLflow run "
                    f"`{run_of(paths.PRETRAIN_CHECKPOINTS)}`",
        "fine-tune": f"{params.finetune.task} / {params.finetune.method}, {finetune.get('steps', '?')} steps, "
                     f"MLflow run `{run_of(paths.FINETUNE_CHECKPOINTS)}`",
        # Aliases move after this report is written (promote, later runs): it names the version scored and
        # where the decision and the aliases after it are, never a current alias as a fact.
        "model": f"`{paths.FINETUNED_MODEL}` version {version}, scored here and given the alias "
                 f"`{paths.CANDIDATE_ALIAS}`; promote's decision and the aliases after it (`champion`, "
                 f"`challenger`): `{paths.PROMOTION_DECISION}` and the promote run" if version
                 else "not registered (tracking down)",
        "evaluate run": f"`{run.run_id}`" if run.run_id else "not tracked",
        "test data": f"`{params.finetune.test_file}`",
    }


def images() -> dict[str, str]:
    """report.md's pictures that exist, by caption: paths relative to reports/."""
    found = {}
    if (paths.FIGURES / "confusion_matrix.png").is_file():
        found["confusion_matrix"] = "figures/confusion_matrix.png"
    if (paths.FIGURES / "label_efficiency.png").is_file():
        found["label_efficiency"] = "figures/label_efficiency.png"
    if (paths.PRETRAIN_REPORTS / "loss.png").is_file():
        found["pretraining loss"] = "pretrain/loss.png"
    if (paths.FINETUNE_REPORTS / "loss.png").is_file():
        found["fine-tuning loss"] = "finetune/loss.png"
    return found


def description(metrics: dict[str, Any], version: str | None, test_file: str) -> str:
    """The evaluate run's description: the model's test figures beside its baselines."""
    base = metrics["baselines"]
    quality = (f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} (majority "
               f"{base['majority_accuracy']:.3f}, bag of words {base['bag_of_words_accuracy']:.3f})"
               if "accuracy" in metrics else ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("sft_")))
    gain = metrics.get("pretraining_gain")
    if gain:
        quality += "; pretraining gain over the same recipe from scratch: " + ", ".join(
            f"{key} {value:+.3f}" for key, value in gain.items())
    return (f"Evaluate `{paths.FINETUNED_MODEL}` version {version} (given the alias `{paths.CANDIDATE_ALIAS}`) on "
            f"{test_file}: {quality}. Pretrained LM: val loss {metrics['val_loss']:.3f} "
            f"vs unigram {base['unigram_entropy']:.3f}. Full report: reports/report.md.")


def log_reports(run: Any, images: dict[str, str]) -> None:
    """evaluate's files to its MLflow run: the reports, report.md with its figures shown, the figures,
    and the loss plots the report links."""
    for name in ("metrics.json", "samples.json", "harness.json", "quantization.json"):
        run.log_artifact(paths.REPORTS / name, "reports")
    run.log_markdown(paths.REPORTS / "report.md", "reports")  # its figures shown in MLflow's viewer
    for path in sorted(paths.FIGURES.glob("*")):
        run.log_artifact(path, "reports/figures")
    for caption, stage in (("pretraining loss", "pretrain"), ("fine-tuning loss", "finetune")):
        if caption in images:  # beside the figures: the report's paths are relative to reports/
            run.log_artifact(paths.REPORTS / stage / "loss.png", f"reports/{stage}")
