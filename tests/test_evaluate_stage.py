"""The evaluate stage on the tiny repository: real `dvc repro`, `dvc metrics show`, a real
local MLflow store and model registry (no mocks)."""

from __future__ import annotations

import json
import shutil

from mlflow.tracking import MlflowClient

from conftest import run, write_params


def test_metrics_json_has_the_model_figures_and_the_baselines(tiny_repo):
    metrics = json.loads((tiny_repo / "reports/metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "perplexity", "val_loss"):
        assert isinstance(metrics[key], float), key
    baselines = metrics["baselines"]
    assert baselines["majority_accuracy"] == 0.5  # two balanced classes in the test file
    assert baselines["bag_of_words_accuracy"] > 0.9  # the toy labels are separable by words
    assert baselines["unigram_entropy"] > 0


def test_dvc_metrics_show_lists_the_evaluation(tiny_repo):
    shown = run(["dvc", "metrics", "show", "--json"], tiny_repo).stdout
    assert "reports/metrics.json" in shown and "macro_f1" in shown


def test_report_and_figures_are_written(tiny_repo):
    png = (tiny_repo / "reports/figures/confusion_matrix.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    report = (tiny_repo / "reports/report.md").read_text()
    assert "figures/confusion_matrix.png" in report and "bag of words" in report
    per_class = (tiny_repo / "reports/figures/per_class.csv").read_text().splitlines()
    assert per_class[0].startswith("label,precision,recall,f1") and len(per_class) == 3
    samples = json.loads((tiny_repo / "reports/samples.json").read_text())
    assert samples["sampling"]["temperature"] == 0.8 and samples["samples"][0]["prompt"] == "The model"


def test_finetuned_model_is_registered_with_the_candidate_alias_and_its_figures(tiny_repo):
    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_repo}/mlflow.db")
    version = client.get_model_version_by_alias("lmforge-finetune", "candidate")
    metrics = json.loads((tiny_repo / "reports/metrics.json").read_text())
    assert float(version.tags["eval.accuracy"]) == round(metrics["accuracy"], 6) or \
        abs(float(version.tags["eval.accuracy"]) - metrics["accuracy"]) < 1e-5
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    evaluate = next(r for r in runs if r.data.tags["lmforge.stage"] == "evaluate")
    assert version.tags["eval.run_id"] == evaluate.info.run_id
    assert evaluate.data.metrics["evaluate/accuracy"] == metrics["accuracy"]
    assert evaluate.data.tags["lmforge.evaluated_model"] == f"models:/lmforge-finetune/{version.version}"
    assert "eval.val_loss" not in version.tags  # the pretrained LM's figure, not the classifier's
    assert "accuracy" in evaluate.data.tags["mlflow.note.content"]


def test_sft_task_reports_text_metrics_and_perplexity(tiny_repo, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(tiny_repo, root, ignore=shutil.ignore_patterns("checkpoints"), symlinks=True)
    write_params(root, finetune={"task": "sft", "train_file": "data/labeled/sft_train.jsonl",
                                 "test_file": "data/labeled/sft_test.jsonl"})
    run(["python", "-m", "stages.finetune"], root)
    run(["python", "-m", "stages.evaluate"], root)
    metrics = json.loads((root / "reports/metrics.json").read_text())
    for key in ("sft_exact_match", "sft_token_f1", "sft_rouge_l", "sft_loss", "sft_val_perplexity"):
        assert key in metrics, key
    assert not (root / "reports/figures/confusion_matrix.png").exists()
    examples = json.loads((root / "reports/figures/sft_examples.json").read_text())
    assert examples[0]["reference"].startswith("Return the")
    harness = json.loads((root / "reports/harness.json").read_text())
    assert set(harness) == {"pretrained", "sft"}  # the SFT model is a causal LM: the harness scores it too
    assert harness["sft"]["lmforge_continuation"]["samples"] == 16
