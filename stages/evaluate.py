"""DVC stage `evaluate`: how good the models are, against what baseline -> reports/.

Language model: loss and perplexity of the pretrained (and an SFT) model on the val shards,
beside the unigram baseline. Classification: accuracy, macro-F1, per-class figures and a
confusion matrix beside majority-class and bag-of-words baselines on the same test split.
SFT: test loss, exact match, token F1, ROUGE-L and generated responses beside the reference.
The fine-tuned model's registered version gets the `candidate` alias and the figures as tags.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any


from lmforge.core import paths
from lmforge.core.stage import run_stage
from lmforge.core.io import atomic_path, write_json
from lmforge.data.tokens.shards import ShardReader
from lmforge.evaluate.metrics import (
    bag_of_words_baseline, language_model_loss, majority_baseline, model_scores, plot_confusion_matrix,
    render_report_md, safe_exp, score_classifier, score_sft, write_confusion_json, write_per_class_csv,
)
from lmforge.model.export import WEIGHTS, load_pretrained
from lmforge.model.generate import sample_prompts
from lmforge.finetune.tuning import check_labels, load_finetuned, read_examples
from lmforge.train.curves import unigram_entropy
from lmforge.model.decoder import Transformer
from lmforge.core.params import Params, load_params
from lmforge.train.resume import run_record
from lmforge.track.lineage import content_hash, git_commit
from lmforge.track.runs import StageRun, stage_run
from lmforge.core.paths import WEIGHTS_TAG

log = logging.getLogger("stages.evaluate")



def evaluate_lm(params: Params, pretrained: Transformer, finetuned: Any) -> dict[str, dict[str, Any]]:
    """Loss/perplexity on the same val rows for each language model, and the unigram floor."""
    val = ShardReader(paths.SHARDS, "val", tokenizer_path=paths.PRETRAINED / "tokenizer.json", verify="size")
    train = ShardReader(paths.SHARDS, "train", verify="size")
    rows, batch = params.evaluate.lm_max_rows, params.runtime.evaluate.lm_micro_batch_size
    results = {"pretrained": language_model_loss(pretrained, val, batch, rows)}
    if finetuned is not None and finetuned.task == "sft":
        results["fine-tuned (SFT)"] = language_model_loss(finetuned.model, val, batch, rows)
    entropy = unigram_entropy(train.blocks(), train.vocab_size)
    results["unigram baseline"] = {"loss": entropy, "perplexity": safe_exp(entropy), "tokens": train.num_tokens}
    return results


def evaluate_classify(params: Params, finetuned: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    ft = params.finetune
    train = read_examples(Path(ft.train_file), ft, "classify")
    test = read_examples(Path(ft.test_file), ft, "classify")
    texts, truth = [r["text"] for r in test], [r["label"] for r in test]
    check_labels(test, finetuned.labels, "label", ft.test_file)
    report = score_classifier(finetuned, texts, truth)
    train_texts, train_labels = [r["text"] for r in train], [r["label"] for r in train]
    baselines = {
        "majority class": majority_baseline(train_labels, truth, finetuned.labels),
        "bag of words (tf-idf + logistic regression)": bag_of_words_baseline(
            train_texts, train_labels, texts, truth, seed=params.finetune.seed, labels=finetuned.labels
        ),
    }
    plot_confusion_matrix(paths.FIGURES / "confusion_matrix.png", report["confusion"], "fine-tuned classifier")
    write_confusion_json(paths.FIGURES / "confusion_matrix.json", report)
    write_per_class_csv(paths.FIGURES / "per_class.csv", report)
    return report, baselines


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


def headline(lm: dict[str, Any], classify: dict[str, Any] | None, baselines: dict[str, Any] | None,
             sft: dict[str, Any] | None) -> dict[str, Any]:
    """metrics.json: the model's own figures at top level, the baselines under `baselines`."""
    metrics: dict[str, Any] = {
        "val_loss": lm["pretrained"]["loss"],
        "perplexity": lm["pretrained"]["perplexity"],
    }
    base: dict[str, Any] = {"unigram_entropy": lm["unigram baseline"]["loss"]}
    if classify is not None:
        metrics |= model_scores("classify", classify)
        base["majority_accuracy"] = baselines["majority class"]["accuracy"]
        base["majority_macro_f1"] = baselines["majority class"]["macro_f1"]
        bow = baselines["bag of words (tf-idf + logistic regression)"]
        base["bag_of_words_accuracy"], base["bag_of_words_macro_f1"] = bow["accuracy"], bow["macro_f1"]
    if sft is not None:
        metrics |= model_scores("sft", sft)
        if "fine-tuned (SFT)" in lm:
            metrics["sft_val_perplexity"] = lm["fine-tuned (SFT)"]["perplexity"]
    return metrics | {"baselines": base}


def tag_candidate(run: StageRun, metrics: dict[str, Any]) -> str | None:
    """Point the `candidate` alias at the registered version of the weights evaluated here, and
    attach the figures; None when none is registered (or tracking is down)."""
    version = run.find_model_version(paths.FINETUNED_MODEL, WEIGHTS_TAG, content_hash(paths.FINETUNED / WEIGHTS))
    if version is None:
        return None
    run.set_model_alias(paths.FINETUNED_MODEL, paths.CANDIDATE_ALIAS, version)
    # The fine-tuned model's own test figures only: val_loss/perplexity are the pretrained LM's.
    own = {key: value for key, value in metrics.items()
           if (key in ("accuracy", "macro_f1", "weighted_f1") or key.startswith("sft_")) and isinstance(value, (int, float))}
    tags = {f"eval.{key}": f"{value:.6g}" for key, value in own.items()}
    run.tag_model_version(paths.FINETUNED_MODEL, version, {**tags, "eval.run_id": str(run.run_id)})
    run.set_tags({"lmforge.evaluated_model": f"models:/{paths.FINETUNED_MODEL}/{version}"})
    return version


def provenance(params: Params, run: StageRun, version: str | None) -> dict[str, Any]:
    """What produced these figures: code, runs, model version, recipe (report.md's first table)."""
    def run_of(checkpoints: Path) -> str:
        return run_record(checkpoints).get("mlflow_run_id") or "not tracked"

    finetune = json.loads((paths.FINETUNE_REPORTS / "metrics.json").read_text()) \
        if (paths.FINETUNE_REPORTS / "metrics.json").is_file() else {}
    pretrain = json.loads((paths.PRETRAIN_REPORTS / "metrics.json").read_text()) \
        if (paths.PRETRAIN_REPORTS / "metrics.json").is_file() else {}
    return {
        "git commit": git_commit(Path.cwd()),
        "pretrain": f"preset `{params.model.preset}`, {pretrain.get('steps', '?')} steps, MLflow run "
                    f"`{run_of(paths.PRETRAIN_CHECKPOINTS)}`",
        "fine-tune": f"{params.finetune.task} / {params.finetune.method}, {finetune.get('steps', '?')} steps, "
                     f"MLflow run `{run_of(paths.FINETUNE_CHECKPOINTS)}`",
        "model": f"`{paths.FINETUNED_MODEL}` version {version} (alias `{paths.CANDIDATE_ALIAS}`)" if version
                 else "not registered (tracking down)",
        "evaluate run": f"`{run.run_id}`" if run.run_id else "not tracked",
        "test data": f"`{params.finetune.test_file}`",
    }


def main() -> None:
    params = load_params()
    inputs = [paths.PRETRAINED, paths.FINETUNED, paths.SHARDS, Path(params.finetune.test_file)]
    with stage_run("evaluate", {"evaluate": params.evaluate, "generate": params.generate}, inputs=inputs) as run:
        shutil.rmtree(paths.FIGURES, ignore_errors=True)  # no figure of another task's run may linger
        paths.FIGURES.mkdir(parents=True)
        finetuned = load_finetuned(paths.FINETUNED)
        pretrained, _ = load_pretrained(paths.PRETRAINED)
        lm = evaluate_lm(params, pretrained, finetuned)
        classify = baselines = sft = None
        sft_examples: list[dict[str, str]] | None = None
        images = {}
        if finetuned.task == "classify":
            classify, baselines = evaluate_classify(params, finetuned)
            images["confusion_matrix"] = "figures/confusion_matrix.png"
        else:
            sft, sft_examples = evaluate_sft(params, finetuned)
        samples = pretrained_samples(params, pretrained)
        write_json(paths.REPORTS / "samples.json", {"sampling": params.generate.model_dump(), "samples": samples})
        metrics = headline(lm, classify, baselines, sft)
        write_json(paths.REPORTS / "metrics.json", metrics)
        if (paths.PRETRAIN_REPORTS / "loss.png").is_file():
            images["pretraining loss"] = "pretrain/loss.png"
        if (paths.FINETUNE_REPORTS / "loss.png").is_file():
            images["fine-tuning loss"] = "finetune/loss.png"
        version = tag_candidate(run, metrics)
        report = render_report_md(
            lm=lm, classification=classify, baselines=baselines, sft=sft, sft_examples=sft_examples,
            samples=samples, sampling=params.generate.model_dump(), images=images,
            provenance=provenance(params, run, version), system=f"fine-tuned lmforge ({finetuned.meta.get('method')})",
        )
        with atomic_path(paths.REPORTS / "report.md") as tmp:
            tmp.write_text(report, encoding="utf-8")
        run.log_metrics(metrics)
        for name in ("metrics.json", "report.md", "samples.json"):
            run.log_artifact(paths.REPORTS / name, "reports")
        for path in sorted(paths.FIGURES.glob("*")):
            run.log_artifact(path, "reports/figures")
        for caption, stage in (("pretraining loss", "pretrain"), ("fine-tuning loss", "finetune")):
            if caption in images:  # report.md's links resolve inside MLflow too
                run.log_artifact(paths.REPORTS / stage / "loss.png", f"reports/{stage}")
        quality = (f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} (majority "
                   f"{metrics['baselines']['majority_accuracy']:.3f}, bag of words "
                   f"{metrics['baselines']['bag_of_words_accuracy']:.3f})" if classify is not None else
                   ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("sft_")))
        run.describe(f"Evaluate `{paths.FINETUNED_MODEL}` version {version} (alias `{paths.CANDIDATE_ALIAS}`) on "
                     f"{params.finetune.test_file}: {quality}. Pretrained LM: val loss {metrics['val_loss']:.3f} "
                     f"vs unigram {metrics['baselines']['unigram_entropy']:.3f}. Full report: reports/report.md.")
        log.info("%s; candidate version %s", json.dumps({k: v for k, v in metrics.items() if k != "baselines"}), version)


if __name__ == "__main__":
    run_stage("evaluate", main)
