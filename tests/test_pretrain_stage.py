"""The pretrain stage as users run it: `dvc repro`, `torchrun`, kill and resume, with a real
local MLflow store and model registry (no mocks)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch

from lmforge.model.export import load_pretrained

from conftest import TINY_PARAMS, run, stage_runs, store_client, tool_env, write_params


def _params(root: Path, **sections) -> None:
    write_params(root, **sections)


def test_repro_trains_exports_and_reports(tiny_repo):
    metrics = json.loads((tiny_repo / "reports/pretrain/metrics.json").read_text())
    assert metrics["steps"] == 6
    vocab = json.loads((tiny_repo / "data/shards/manifest.json").read_text())["vocab_size"]
    assert metrics["val_loss"] < math.log(vocab) - 0.3  # below a uniform guess: it learned (6 tiny steps)
    for path in ("loss.png", "curve.csv"):
        assert (tiny_repo / "reports/pretrain" / path).stat().st_size > 0
    curve = (tiny_repo / "reports/pretrain/curve.csv").read_text().splitlines()
    assert curve[0] == "step,train_loss,val_loss,lr,grad_norm,tokens_per_s,val_ppl" and len(curve) == 7
    # One row per step; val columns only on eval steps (eval_every 3), nan between.
    assert [row.split(",")[2] != "nan" for row in curve[1:]] == [False, False, True, False, False, True]
    model, config = load_pretrained(tiny_repo / "models/pretrain")
    assert config.vocab_size == json.loads((tiny_repo / "data/shards/manifest.json").read_text())["vocab_size"]
    assert (tiny_repo / "models/pretrain/tokenizer.json").is_file()


def test_hf_export_from_the_stage_matches_our_logits(tiny_repo):
    from transformers import LlamaForCausalLM

    ours, _ = load_pretrained(tiny_repo / "models/pretrain")
    theirs = LlamaForCausalLM.from_pretrained(tiny_repo / "models/pretrain_hf").eval()
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours.eval()(idx), atol=1e-4, rtol=1e-4)


def test_mlflow_run_has_the_loss_at_every_step_and_a_registered_model(tiny_repo, monkeypatch):
    (run_,) = stage_runs(tiny_repo, "pretrain")
    client = store_client(tiny_repo)
    history = client.get_metric_history(run_.info.run_id, "pretrain/train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert sorted(m.step for m in client.get_metric_history(run_.info.run_id, "pretrain/val_loss")) == [3, 6]
    assert run_.data.metrics["pretrain/unigram_entropy"] > 0
    assert run_.data.params["model.dim"] == "32" and run_.data.tags["lmforge.parameters"].isdigit()
    assert run_.data.params["pretrain.max_steps"] == "6"
    versions = client.search_model_versions("name='lmforge-pretrain'")
    assert len(versions) == 1 and versions[0].run_id == run_.info.run_id
    # set_tracking_uri also exports MLFLOW_TRACKING_URI: through monkeypatch, so that the variable does
    # not outlive this test in the worker process (later tests would read this store as their own)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tiny_repo}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tiny_repo}/mlflow.db")
    logged = mlflow.pytorch.load_model("models:/lmforge-pretrain/1")
    ours, _ = load_pretrained(tiny_repo / "models/pretrain")
    idx = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(logged(idx), ours.eval()(idx))  # a torch.export graph (pt2): no eval()


def test_dvc_plots_and_metrics_list_the_pretrain_figures(tiny_repo):
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], tiny_repo).stdout)
    text = json.dumps(shown)
    assert "reports/pretrain/metrics.json" in text and "val_loss" in text
    plots = json.loads(run(["dvc", "plots", "show", "--json"], tiny_repo).stdout)["data"]
    assert {row["field"] for row in plots["pretrain_loss"][0]["content"]["data"]["values"]} == {"train_loss", "val_loss"}


def test_tensor_parallel_stage_follows_the_one_process_run_and_logs_the_bytes_per_step(trained_ready, tiny_repo,
                                                                                        monkeypatch):
    root = trained_ready
    _params(root, pretrain={"tensor_parallel": 2}, runtime={"pretrain": {"nproc": 2}})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # as in a user's shell: torchrun would print a banner
    result = run(["python", "-m", "lmforge.train.launch", "stages.pretrain"], root)
    # no library hints on the user's terminal
    assert "torch/distributed" not in result.stderr and "OMP_NUM_THREADS" not in result.stderr
    stats = json.loads((root / "reports/pretrain/stats.json").read_text())
    alone = json.loads((tiny_repo / "reports/pretrain/stats.json").read_text())  # the same params, 1 process
    assert (stats["world_size"], stats["tensor_parallel"]) == (2, 2)
    assert stats["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-5)
    # One data-parallel rank: FSDP sends nothing; TP all-reduces activations.
    assert stats["comm_bytes_reduce_scatter"] == 0 and stats["comm_bytes_tp_all_reduce"] > 0
    (tp_run,) = stage_runs(root, "pretrain")
    assert tp_run.data.metrics["pretrain/comm_bytes_total"] == stats["comm_bytes_total"]
    assert tp_run.data.tags["lmforge.tensor_parallel"] == "2"
    # models/pretrain holds full tensors whatever the layout: the one-process shapes.
    ours, _ = load_pretrained(root / "models/pretrain")
    theirs, _ = load_pretrained(tiny_repo / "models/pretrain")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_killed_stage_resumes_from_its_checkpoint_in_the_same_run(trained_ready):
    root = trained_ready
    _params(root, pretrain={**TINY_PARAMS["pretrain"], "max_steps": 16, "eval_every": 0},
            runtime={"pretrain": {"checkpoint_every": 2}})
    process = subprocess.Popen(["python", "-m", "stages.pretrain"], cwd=root, env=tool_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = root / "checkpoints/pretrain"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step_*[0-9]")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = max(int(p.name.split("_")[1]) for p in checkpoints.glob("step_*[0-9]"))
    assert saved < 16, "the run finished before it was killed"
    result = run(["python", "-X", "importtime", "-m", "stages.pretrain"], root)
    assert f"at step {saved}" in result.stderr
    # The agent writes the run while it trains (lmforge.track.live): MLflow stays out of the stage.
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and not {"mlflow", "sqlalchemy", "alembic"} & imported
    curve = (root / "reports/pretrain/curve.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in curve] == list(range(1, 17))
    (only,) = stage_runs(root, "pretrain")
    steps = {m.step for m in store_client(root).get_metric_history(only.info.run_id, "pretrain/train_loss")}
    assert steps == set(range(1, 17))


def test_micro_batch_larger_than_the_data_is_a_clear_error(trained_ready):
    root = trained_ready
    _params(root, pretrain={**TINY_PARAMS["pretrain"], "micro_batch_size": 100000})
    result = run(["python", "-m", "stages.pretrain"], root, check=False)
    assert result.returncode == 2 and "micro_batch_size" in result.stderr and "Traceback" not in result.stderr


def test_shards_from_another_tokenizer_are_refused(trained_ready):
    root = trained_ready
    other = json.loads((root / "data/tokenizer/tokenizer.json").read_text())
    other["model"]["merges"] = other["model"]["merges"][:-1]
    (root / "data/tokenizer/tokenizer.json").write_text(json.dumps(other))
    result = run(["python", "-m", "stages.pretrain"], root, check=False)
    assert result.returncode == 2 and "another tokenizer" in result.stderr


def _edit_manifest(root: Path, **fields) -> Path:
    path = root / "data/shards/manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, **fields}))
    return path


def test_a_manifest_eos_id_that_disagrees_with_the_tokenizer_is_one_line_naming_it(trained_ready):
    root = trained_ready
    eos = json.loads((root / "data/shards/manifest.json").read_text())["eos_id"]
    _edit_manifest(root, eos_id=eos + 3)
    result = run(["python", "-m", "stages.pretrain"], root, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "data/shards/manifest.json: eos_id" in line and "dvc repro -f tokenize" in line


def test_a_manifest_vocab_beyond_the_tokenizer_is_blamed_on_the_manifest_not_the_checkpoints(trained_repo):
    root = trained_repo  # checkpoints of this very run exist
    vocab = json.loads((root / "data/shards/manifest.json").read_text())["vocab_size"]
    _edit_manifest(root, vocab_size=vocab + 64)
    result = run(["python", "-m", "stages.pretrain"], root, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "data/shards/manifest.json: vocab_size" in line and "checkpoint" not in line


def test_changed_params_start_a_fresh_run_beside_checkpoints_linked_to_another_disk(trained_repo, tmp_path):
    """One pretrain run after changing what a run computes, with its checkpoints on another disk through
    a link (lmforge.train.resume; tests/test_resume.py holds each case alone): a fresh run and a new
    MLflow run; the old checkpoints moved aside on that disk, over the ones moved aside before them."""
    root = trained_repo  # pretrain's run and checkpoints with TINY_PARAMS
    disk = tmp_path / "big-disk"
    disk.mkdir()
    shutil.move(root / "checkpoints/pretrain", disk / "pretrain")
    (root / "checkpoints/pretrain").symlink_to(disk / "pretrain", target_is_directory=True)
    (disk / "pretrain.stale/step_00000002").mkdir(parents=True)  # an earlier run's, moved aside before
    (disk / "pretrain.stale/run.json").write_text(json.dumps({"fingerprint": {"pretrain": {"lr": 0.01}}}))
    trained = json.loads((disk / "pretrain/run.json").read_text())["fingerprint"]
    # The LR schedule depends on max_steps: continuing would not equal a fresh 8-step run; nor can
    # checkpoints of another width load.
    _params(root, model={"preset": "tiny", "dim": 64}, pretrain={**TINY_PARAMS["pretrain"], "max_steps": 8})
    result = run(["python", "-m", "stages.pretrain"], root)
    (line,) = [line for line in result.stderr.splitlines() if "starting fresh" in line]
    assert "model.dim" in line and "pretrain.max_steps" in line and "resumed from" not in result.stderr
    assert (root / "checkpoints/pretrain").is_symlink() and not (root / "checkpoints/pretrain.stale").exists()
    assert json.loads((disk / "pretrain.stale/run.json").read_text())["fingerprint"] == trained
    assert json.loads((disk / "pretrain/run.json").read_text())["fingerprint"]["pretrain"]["max_steps"] == 8
    assert (disk / "pretrain/step_00000008").is_dir()
    assert len(stage_runs(root, "pretrain")) == 2
