"""The evaluate stage on the tiny repository: real `dvc repro`, `dvc metrics show`, a real
local MLflow store and model registry (no mocks)."""

from __future__ import annotations

import csv
import json
import shutil

import torch
from mlflow.tracking import MlflowClient

from conftest import copy_repo, registered_versions, run, write_params
from lmforge.finetune.inference import load_finetuned


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


def test_sft_with_lora_exports_the_merged_model_and_its_adapter_and_reports_text_metrics(tiny_repo, tmp_path):
    root = copy_repo(tiny_repo, tmp_path / "repo", ignore=shutil.ignore_patterns("checkpoints"))
    write_params(root, finetune={"task": "sft", "method": "lora", "train_file": "data/labeled/sft_train.jsonl",
                                 "test_file": "data/labeled/sft_test.jsonl"})
    run(["python", "-m", "stages.finetune"], root)
    # LoRA: the adapters merged into the exported weights, and the adapter beside them
    for name in ("model.safetensors", "config.json", "tokenizer.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (root / "models/finetune" / name).is_file(), name
    stats = json.loads((root / "reports/finetune/stats.json").read_text())
    assert 0 < stats["trainable_params"] < stats["total_params"] / 4
    assert json.loads((root / "reports/finetune/metrics.json").read_text())["best_val_loss"] > 0
    assert registered_versions(root) == [*registered_versions(tiny_repo), len(registered_versions(tiny_repo)) + 1]
    model = load_finetuned(root / "models/finetune")
    (out,) = model.generate(["def read_1(x)"], max_new_tokens=4)
    loss, n = model.lm_loss(["def read_1(x)"], ["Return the read."])
    assert isinstance(out, str) and n > 0 and loss > 0
    assert not any("lora" in k for k in model.model.state_dict())
    run(["python", "-m", "stages.evaluate"], root)
    metrics = json.loads((root / "reports/metrics.json").read_text())
    for key in ("sft_exact_match", "sft_token_f1", "sft_rouge_l", "sft_loss", "sft_val_perplexity"):
        assert key in metrics, key
    gain, base = metrics["pretraining_gain"], metrics["baselines"]
    assert gain["sft_rouge_l"] == metrics["sft_rouge_l"] - base["scratch_sft_rouge_l"]
    assert gain["sft_loss"] == base["scratch_sft_loss"] - metrics["sft_loss"]  # a lower loss is a positive gain
    assert not (root / "reports/figures/confusion_matrix.png").exists()
    examples = json.loads((root / "reports/figures/sft_examples.json").read_text())
    assert examples[0]["reference"].startswith("Return the")
    harness = json.loads((root / "reports/harness.json").read_text())
    assert set(harness) == {"pretrained", "sft"}  # the SFT model is a causal LM: the harness scores it too
    assert harness["sft"]["lmforge_continuation"]["samples"] == 16


def test_the_same_recipe_from_scratch_is_scored_and_the_gain_is_pretrained_minus_scratch(tiny_repo):
    metrics = json.loads((tiny_repo / "reports/metrics.json").read_text())
    base, gain = metrics["baselines"], metrics["pretraining_gain"]
    assert set(gain) == {"accuracy", "macro_f1"}
    for key in gain:
        assert gain[key] == metrics[key] - base[f"scratch_{key}"], key
    assert 0 <= base["scratch_accuracy"] <= 1 and "scratch_weighted_f1" in base
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], tiny_repo).stdout)[""]["data"]["reports/metrics.json"]
    assert shown["data"]["pretraining_gain"] == gain  # experiments compare on it
    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_repo}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    evaluate = next(r for r in runs if r.data.tags["lmforge.stage"] == "evaluate")
    assert evaluate.data.metrics["evaluate/pretraining_gain.accuracy"] == gain["accuracy"]
    assert evaluate.data.metrics["evaluate/baselines.scratch_macro_f1"] == base["scratch_macro_f1"]


def test_the_report_leads_with_the_model_the_same_recipe_from_scratch_bag_of_words_and_majority(tiny_repo):
    report = (tiny_repo / "reports/report.md").read_text()
    headline = report.split("## Headline")[1].split("| provenance |")[0]
    rows = [line.split(" | ")[0].lstrip("| ") for line in headline.splitlines()
            if line.startswith("| ") and not line.startswith(("| system", "| ---"))]
    assert rows == ["fine-tuned lmforge (full)", "same recipe from scratch (random initial weights)",
                    "bag of words (tf-idf + logistic regression)", "majority class"]
    assert report.index("## Headline") < report.index("| provenance |") < report.index("## Language modelling")
    assert "What pretraining bought" in headline


def test_the_loss_pretraining_started_from_is_its_curves_first_step_beside_the_unigram_entropy(tiny_repo):
    with (tiny_repo / "reports/pretrain/curve.csv").open() as handle:
        first = float(next(csv.DictReader(handle))["train_loss"])
    metrics = json.loads((tiny_repo / "reports/metrics.json").read_text())
    assert metrics["baselines"]["first_step_loss"] == first
    report = (tiny_repo / "reports/report.md").read_text()
    assert f"Pretraining took the loss from {first:.3f} to {metrics['val_loss']:.3f} nats/token" in report


def test_the_scratch_backbone_is_the_pretrained_architecture_initialised_as_a_load_would_leave_the_generator(tiny_repo):
    from lmforge.model.export import load_pretrained

    torch.manual_seed(0)
    pretrained, config = load_pretrained(tiny_repo / "models/pretrain")
    after_load = torch.rand(3)
    torch.manual_seed(0)
    scratch, scratch_config = load_pretrained(tiny_repo / "models/pretrain", random_init=True)
    assert scratch_config == config and torch.equal(torch.rand(3), after_load)  # the head drawn next: the same
    weights = dict(pretrained.named_parameters())
    assert {name for name, _ in scratch.named_parameters()} == set(weights)
    assert not torch.equal(scratch.embed.weight, weights["embed.weight"])


def test_label_efficiency_at_tiny_sizes_writes_its_table_and_plot(tiny_repo, tmp_path, monkeypatch):
    # In this process, the evaluate stage's calls alone: its wiring is the tests' above (report.md, metrics).
    from lmforge.core.params import load_params
    from lmforge.evaluate import evaluation
    from lmforge.evaluate.report import render_report_md
    from lmforge.finetune.inference import load_finetuned

    root = copy_repo(tiny_repo, tmp_path / "repo")
    write_params(root, evaluate={"label_efficiency": True, "label_efficiency_sizes": [16, 10_000]})
    monkeypatch.chdir(root)
    params, metrics = load_params(), json.loads((root / "reports/metrics.json").read_text())
    finetuned = load_finetuned("models/finetune")
    report, baselines = evaluation.evaluate_classify(params, finetuned)
    measured = evaluation.evaluate_gain(params, finetuned, report, baselines)
    assert measured.gain == metrics["pretraining_gain"]  # the stage's scratch run, rerun: the same figures
    rows = list(csv.DictReader((root / "reports/figures/label_efficiency.csv").open()))
    assert [row["train_examples"] for row in rows[:-1]] == ["16"]  # 10,000 is more than all: the last row
    assert float(rows[-1]["pretrained_accuracy"]) == metrics["accuracy"]
    assert float(rows[-1]["scratch_accuracy"]) == metrics["baselines"]["scratch_accuracy"]
    assert all(0 <= float(row[f"{system}_accuracy"]) <= 1 for row in rows for system in ("pretrained", "scratch"))
    assert (root / "reports/figures/label_efficiency.png").read_bytes().startswith(b"\x89PNG")
    section = render_report_md(classification=report, baselines=baselines, pretraining=measured,
                               images=evaluation.images()).split("## Label efficiency")[1]
    assert "| 16 |" in section and f"| all ({rows[-1]['train_examples']}) |" in section
    assert "![label efficiency](figures/label_efficiency.png)" in section


def test_the_int8_model_is_written_scored_beside_fp32_and_reported(tiny_repo):
    from lmforge.model.quantize import load_quantized

    metrics = json.loads((tiny_repo / "reports/metrics.json").read_text())
    result = json.loads((tiny_repo / "reports/quantization.json").read_text())
    full, small = result["rows"]
    assert result["mode"] == "int8_weight_only" and small["bytes"] < full["bytes"]
    assert metrics["int8"] == {"perplexity": small["perplexity"], "perplexity_increase": result["perplexity_increase"],
                               "size_ratio": small["bytes"] / full["bytes"], "accuracy": small["accuracy"]}
    assert full["perplexity"] == metrics["perplexity"] and full["accuracy"] == metrics["accuracy"]
    assert result["flagged"] == (result["perplexity_increase"] > result["max_perplexity_increase"])
    model = load_quantized(tiny_repo / "models/pretrain_int8")  # what a user loads
    assert type(model.layers[0].attn.q_proj.weight).__name__ != "Tensor"
    report = (tiny_repo / "reports/report.md").read_text()
    assert "## int8 quantization (int8_weight_only)" in report and "| pretrained (int8_weight_only) |" in report
    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_repo}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    evaluate = next(r for r in runs if r.data.tags["lmforge.stage"] == "evaluate")
    assert evaluate.data.metrics["evaluate/int8.perplexity_increase"] == result["perplexity_increase"]
    assert evaluate.data.metrics["evaluate/generation_tokens_per_s.int8"] > 0
