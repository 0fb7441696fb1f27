"""The finetune stage as users run it (`python -m stages.finetune` after the data stages and pretrain),
with a real local MLflow store and model registry (no mocks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmforge.core.params import FinetuneParams
from lmforge.finetune import recipe
from lmforge.finetune.inference import load_finetuned
from lmforge.train.trainer import TrainResult
from lmforge.core.digests import content_hash

from conftest import TINY_PARAMS, run


def _client(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")


def _finetune_runs(root: Path):
    client = _client(root)
    experiment = client.get_experiment_by_name("lmforge")
    return [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags["lmforge.stage"] == "finetune"]


@pytest.fixture
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny pipeline (pretrained model ready, a fresh MLflow store, no checkpoints)."""
    root = tmp_path / "repo"
    shutil.copytree(tiny_repo, root, ignore=shutil.ignore_patterns("mlflow.db", "mlruns", "checkpoints"), symlinks=True)
    return root


def _finetune_params(root: Path, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["finetune"] = {**TINY_PARAMS["finetune"], **values}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def test_stage_fine_tunes_a_classifier_exports_it_and_registers_a_version(tiny_repo):
    """What `dvc repro` left of the finetune stage (TINY_PARAMS: classify, full)."""
    metrics = json.loads((tiny_repo / "reports/finetune/metrics.json").read_text())
    stats = json.loads((tiny_repo / "reports/finetune/stats.json").read_text())
    assert stats["task"] == "classify" and stats["method"] == "full"
    assert metrics["steps"] == stats["steps"] == TINY_PARAMS["finetune"]["max_steps"]
    assert 0 <= metrics["best_val_accuracy"] <= 1 and metrics["best_val_loss"] > 0
    assert stats["trainable_params"] == stats["total_params"] > 0
    curve = (tiny_repo / "reports/finetune/curve.csv").read_text().splitlines()
    assert curve[0] == "step,train_loss,lr,val_loss,val_accuracy" and len(curve) == 1 + metrics["steps"]
    model = load_finetuned(tiny_repo / "models/finetune")
    assert model.labels == ["code", "nature"]
    assert set(model.predict(["read write value", "river stone light"])) <= {"code", "nature"}
    config = json.loads((tiny_repo / "models/finetune/config.json").read_text())
    assert {"task", "method", "labels", "pooling", "max_length", "prompt_separator", "dim"} <= set(config)
    (run_,) = _finetune_runs(tiny_repo)
    history = _client(tiny_repo).get_metric_history(run_.info.run_id, "finetune/train_loss")
    assert sorted(m.step for m in history) == list(range(1, metrics["steps"] + 1))
    (version,) = _client(tiny_repo).search_model_versions(f"name = 'lmforge-finetune' and run_id = '{run_.info.run_id}'")
    assert version.tags["lmforge.weights_md5"] == content_hash(tiny_repo / "models/finetune/model.safetensors")
    assert "registered_version" not in metrics  # metrics.json is the same whether tracking is up or down
    assert run_.data.params["finetune.task"] == "classify"
    assert any(k.startswith("lmforge.input.") and "models/pretrain" in k for k in run_.data.tags)


def test_unseen_test_label_stops_the_stage_with_one_line(repo):
    with (repo / "data/labeled/test.jsonl").open("a") as handle:
        handle.write(json.dumps({"id": "new", "text": "a bird sings", "label": "birds"}) + "\n")
    result = run(["python", "-m", "stages.finetune"], repo, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'birds'" in result.stderr and "data/labeled/test.jsonl" in result.stderr


def test_missing_field_and_unknown_lora_target_name_the_params_key(repo):
    _finetune_params(repo, text_field="body")
    result = run(["python", "-m", "stages.finetune"], repo, check=False)
    assert result.returncode == 2 and "finetune.text_field" in result.stderr and "Traceback" not in result.stderr
    _finetune_params(repo, method="lora", lora={"target_modules": ["q_proj", "qkv"]})
    result = run(["python", "-m", "stages.finetune"], repo, check=False)
    assert result.returncode == 2 and "qkv" in result.stderr and "gate_proj" in result.stderr


def test_pretrained_model_from_another_tokenizer_is_refused(repo):
    other = json.loads((repo / "data/tokenizer/tokenizer.json").read_text())
    other["model"]["merges"] = other["model"]["merges"][:-1]
    (repo / "data/tokenizer/tokenizer.json").write_text(json.dumps(other))
    result = run(["python", "-m", "stages.finetune"], repo, check=False)
    assert result.returncode == 2 and "another tokenizer" in result.stderr


def test_a_classifier_records_no_perplexity_of_its_loss(tiny_repo):
    (run_,) = _finetune_runs(tiny_repo)
    assert "finetune/val_loss" in run_.data.metrics and "finetune/val_accuracy" in run_.data.metrics
    assert not [name for name in run_.data.metrics if "ppl" in name or "perplexity" in name]


def test_a_classifier_s_loss_is_plotted_per_example_and_an_sft_loss_per_token():
    result = TrainResult(step=2, train_loss=0.5, val_loss=0.6, val_ppl=None, tokens_seen=0, checkpoint=None,
                         val_metrics={}, best_step=2, best_metrics={"val_loss": 0.6}, stopped_early=False)
    summary = {"train_examples": 10, "trainable_params": 5, "total_params": 5}
    for task, unit in (("classify", "nats/example"), ("sft", "nats/token")):
        report = recipe.report(FinetuneParams(task=task), result, [], summary)
        assert report.loss_label == f"cross-entropy ({unit})", task
