"""The fault matrix (issue 10): what a hostile user or a bad day does to the stages, and what
must hold: the exit status, one line naming the file or key, no traceback, outputs unchanged or
complete. Real DVC, MLflow and processes; faults made for real (closed ports, damaged files,
read-only and full file systems) where the platform allows it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmforge.train.checkpoint import CheckpointManager
from lmforge.core.io import sweep_stale_temps, write_json
from lmforge.core.errors import LmforgeError
from lmforge.core.params import DataParams, parse_params
from lmforge.train.resume import claim_run_dir
from lmforge.track.runs import stage_run
from lmforge.track.store import LOGGING_FAILED_MARKER
from lmforge.core.params import TrainerParams
from lmforge.train.batches import PackedRows

from lmforge.train.trainer import Trainer

from conftest import LIGHT_EVALUATE, REPO, registered_versions, run, tiny_params, write_params
from train_helper import SyntheticRows, tiny_config

SECRET = "s3cr3t-pw"
STAGES = ("ingest", "clean", "tokenize", "pretrain", "finetune_data", "finetune", "evaluate", "promote")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy(src: Path, dst: Path, *, store: bool = False, checkpoints: bool = True) -> Path:
    ignore = [] if store else ["mlflow.db", "mlruns"]
    ignore += [] if checkpoints else ["checkpoints"]
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(*ignore))
    return dst


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@contextlib.contextmanager
def _mounted_tmpfs(where: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs at `where` (root only); skips the test where the platform refuses it."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root and CAP_SYS_ADMIN")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _one_line_no_traceback(result: subprocess.CompletedProcess, *needles: str) -> str:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if all(n in line for n in needles)]
    assert lines, f"no line with {needles} in:\n{output}"
    return lines[0]


# ------------------------------------------------------------------ tracking down, every stage


def _store(kind: str, root: Path, stack: contextlib.ExitStack) -> dict[str, str]:
    if kind == "closed port":
        return {"MLFLOW_TRACKING_URI": f"http://lmforge:{SECRET}@127.0.0.1:{_free_port()}"}
    if kind == "damaged sqlite":
        (root / "mlflow.db").write_bytes(np.random.default_rng(0).bytes(64 * 1024))
        return {}
    store = stack.enter_context(_mounted_tmpfs(root.parent / "ro-store", "1m", read_only=True))
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}


def test_every_stage_finishes_its_work_when_tracking_is_down(tiny_repo, tmp_path):
    """The whole pipeline with its server gone. Every stage meets the store through stage_run's probe
    alone (a failed probe: no MLflow call after it), so one way of being down covers every stage;
    each way of being down is one stage's test below. Run on one thread with another hash seed than
    `tiny_repo`'s `dvc repro` (torch's default threads, a random PYTHONHASHSEED): the weights are
    those bytes all the same (what differs between machines, CPU kernels, or package versions is
    not here)."""
    root = _copy(tiny_repo, tmp_path / "repo", checkpoints=False)
    # Evaluate without its harness and from-scratch fine-tune (they never meet the store; tiny_repo's
    # run has them): its metrics.json then lacks pretraining_gain alone.
    write_params(root, evaluate=LIGHT_EVALUATE)
    light = {"reports/metrics.json": {"pretraining_gain"}}
    with contextlib.ExitStack() as stack:
        env = _store("closed port", root, stack)
        result = run(["dvc", "repro", "-f"], root, check=False, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                     PYTHONHASHSEED="12345", **env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output and SECRET not in output
    warnings = [line for line in output.splitlines() if line.startswith(LOGGING_FAILED_MARKER)]
    assert len(warnings) == len(STAGES), warnings  # one line per stage, naming the store
    assert all("MLFLOW_TRACKING_URI=" in w for w in warnings)
    # The outputs DVC records are those of a run with tracking up (same seeds, same machine).
    for metrics in ("reports/pretrain/metrics.json", "reports/finetune/metrics.json", "reports/metrics.json"):
        down, up = (json.loads((r / metrics).read_text()) for r in (root, tiny_repo))
        assert down.keys() == up.keys() - light.get(metrics, set()), metrics
        for key in ("val_loss", "best_val_loss", "accuracy", "train_loss"):
            if key in up:
                assert math.isclose(down[key], up[key], rel_tol=1e-4), (metrics, key)
    assert (root / "reports/report.md").is_file()
    for model in ("models/pretrain/model.safetensors", "models/finetune/model.safetensors"):  # bitwise reproducible
        assert (root / model).read_bytes() == (tiny_repo / model).read_bytes(), model


@pytest.mark.parametrize("kind", ["damaged sqlite", "read-only store"])
def test_a_store_that_cannot_take_a_run_is_one_line_and_the_stage_does_its_work(data_repo, tmp_path, kind):
    root = _copy(data_repo, tmp_path / "repo")
    shutil.rmtree(root / "data/raw")
    with contextlib.ExitStack() as stack:
        env = _store(kind, root, stack)
        result = run([sys.executable, "-m", "stages.ingest"], root, check=False, **env)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output
    (warning,) = [line for line in output.splitlines() if line.startswith(LOGGING_FAILED_MARKER)]
    assert "MLFLOW_TRACKING_URI=" in warning or "local store" in warning
    assert json.loads((root / "data/raw/stats.json").read_text())["documents"] == 200


def test_a_dead_server_costs_seconds_and_no_secret_in_any_output(data_repo, tmp_path):
    root = _copy(data_repo, tmp_path / "repo")
    result = run([sys.executable, "-m", "stages.ingest"], root, check=False,
                 MLFLOW_TRACKING_URI=f"http://user:{SECRET}@127.0.0.1:{_free_port()}/?token=tok-{SECRET}")
    assert result.returncode == 0, result.stderr
    line = _one_line_no_traceback(result, LOGGING_FAILED_MARKER)
    assert "user:***@127.0.0.1" in line and SECRET not in result.stdout + result.stderr


# ---------------------------------------------------------------------- a finished run resumed


def test_a_finished_run_resumed_keeps_its_figures(tiny_repo, tmp_path):
    root = _copy(tiny_repo, tmp_path / "repo", store=True)
    for stage, metrics in (("pretrain", "reports/pretrain/metrics.json"), ("finetune", "reports/finetune/metrics.json")):
        before = json.loads((root / metrics).read_text())
        result = run([sys.executable, "-m", f"stages.{stage}"], root)
        after = json.loads((root / metrics).read_text())
        compared = [k for k in ("train_loss", "val_loss", "val_perplexity", "final_val_loss", "best_val_loss")
                    if k in before]
        assert compared, (stage, sorted(before))  # else the check below would hold of nothing
        for key in compared:
            assert after[key] == before[key] and after[key] is not None, (stage, key)
        assert "nan" not in result.stderr
        # the same run (its checkpoints' tracking key) and the same weights: no second version
        assert registered_versions(root, f"lmforge-{stage}") == [1], stage


# ------------------------------------------------------------------- nothing reaches a shell


def test_no_dvc_cmd_interpolates_a_param():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert all("${" not in stage["cmd"] for stage in stages.values())


def test_a_shell_injection_through_params_runs_nothing(data_repo, tmp_path):
    root = _copy(data_repo, tmp_path / "repo")
    params = tiny_params(runtime={"pretrain": {"nproc": "1 stages.pretrain; touch INJECTED #"}})
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    result = run(["dvc", "repro", "--single-item", "pretrain"], root, check=False)
    assert result.returncode != 0 and not (root / "INJECTED").exists()
    _one_line_no_traceback(result, "error", "runtime.pretrain.nproc")


# ---------------------------------------------------------- params refused at load, one line


@pytest.mark.parametrize("section, values, key", [
    ("pretrain", {"lr": float("inf")}, "pretrain.lr"),
    ("finetune", {"weight_decay": float("nan")}, "finetune.weight_decay"),
    ("generate", {"temperature": float("nan")}, "generate.temperature"),
    ("clean", {"max_top_ngram_char_fraction": {2: float("nan")}}, "clean.max_top_ngram_char_fraction"),
    ("generate", {"prompts": []}, "generate.prompts"),
    ("generate", {"prompts": ["  "]}, "generate.prompts"),
    ("finetune", {"test_file": None}, "finetune.test_file"),
    ("tokenizer", {"seq_len": 2147483648}, "tokenizer.seq_len"),
    ("tokenizer", {"vocab_size": 2**32 + 1}, "tokenizer.vocab_size"),
    ("generate", {"max_new_tokens": 256}, "generate.max_new_tokens"),
    ("evaluate", {"sft_max_new_tokens": 300}, "evaluate.sft_max_new_tokens"),
    ("finetune", {"max_length": 257}, "finetune.max_length"),
])
def test_senseless_params_are_refused_at_load_naming_the_key(section, values, key):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw[section] = {**raw[section], **values}
    with pytest.raises(LmforgeError) as caught:
        parse_params(raw)
    message = str(caught.value)
    assert key in message and len(message.splitlines()) == 1, message


# ----------------------------------------------------------------------------- training faults


def _trainer(tmp_path: Path, **kwargs) -> Trainer:
    from lmforge.model.decoder import Transformer

    torch_model = Transformer(tiny_config())
    config = TrainerParams(max_steps=4, micro_batch_size=4, warmup_steps=1, eval_every=0, checkpoint_every=1,
                         progress=False)
    return Trainer(torch_model, config, PackedRows(SyntheticRows(64, 0), SyntheticRows(16, 1)), **kwargs)


def test_a_non_finite_loss_stops_training_naming_the_step(tmp_path):
    from lmforge.model.loss import lm_loss

    calls = []

    def poisoned(model, batch):
        calls.append(1)
        loss, n = lm_loss(model, batch)
        return (loss * float("nan"), n) if len(calls) == 3 else (loss, n)

    trainer = _trainer(tmp_path, loss_fn=poisoned, checkpoint_dir=tmp_path / "ckpt")
    with pytest.raises(LmforgeError, match=r"loss is nan at step 3"):
        trainer.fit()
    assert trainer.step == 2  # the poisoned step never reached the optimizer


def test_deleting_the_checkpoint_dir_mid_run_stops_with_what_to_do(tmp_path):
    ckpt = tmp_path / "ckpt"
    claim_run_dir(ckpt, {"x": 1}, "auto")

    def delete_after_step_2(step, metrics):
        if step == 2:
            shutil.rmtree(ckpt)

    trainer = _trainer(tmp_path, checkpoint_dir=ckpt, on_metrics=delete_after_step_2)
    with pytest.raises(LmforgeError, match=r"was deleted while training.*rerun the stage|Rerun the stage"):
        trainer.fit()


def test_a_checkpoint_another_run_wrote_or_someone_changed_is_never_unpickled(tmp_path):
    from lmforge.model.decoder import Transformer

    model = Transformer(tiny_config())
    optim = __import__("torch").optim.AdamW(model.parameters())
    CheckpointManager(tmp_path / "theirs", owner="their-run").save(1, model, optim, {})
    with pytest.warns(UserWarning, match="another run"), pytest.raises(LmforgeError, match="could be loaded"):
        CheckpointManager(tmp_path / "theirs", owner="our-run").load(model, optim)
    ours = CheckpointManager(tmp_path / "ours", owner="our-run")
    path = ours.save(1, model, optim, {})
    (path / ".metadata").write_bytes((path / ".metadata").read_bytes() + b"\x00")
    with pytest.warns(UserWarning, match="differ from their recorded sha256"), pytest.raises(LmforgeError):
        ours.load(model, optim)


# ------------------------------------------------------------------------ files and processes


def test_temps_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    stale_file = tmp_path / f".documents.parquet.tmp-{dead}"
    stale_dir = tmp_path / f".pretrain.tmp-{dead}-abc123"
    live_file = tmp_path / f".other.json.tmp-{alive}"
    stale_file.write_text("partial")
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x" * 100)
    live_file.write_text("being written")
    write_json(tmp_path / "stats.json", {"ok": 1})  # any atomic write into the directory sweeps it
    assert not stale_file.exists() and not stale_dir.exists()
    assert live_file.exists() and sweep_stale_temps(tmp_path) == []


def test_runs_left_running_by_a_dead_process_are_marked_killed(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with stage_run("ingest", {"data": DataParams()}, inputs=[], root=tmp_path):
        pass
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("lmforge").experiment_id
    orphan = client.create_run(experiment, tags={"lmforge.host": socket.gethostname(), "lmforge.pid": str(_dead_pid())})
    other_host = client.create_run(experiment, tags={"lmforge.host": "elsewhere", "lmforge.pid": "1"})
    with stage_run("clean", {}, inputs=[], root=tmp_path):
        pass
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert client.get_run(other_host.info.run_id).info.status == "RUNNING"


def test_a_copied_workspace_logs_into_its_own_store(tiny_repo, tmp_path):
    original_files = sorted(p for p in (tiny_repo / "mlruns").rglob("*"))
    root = _copy(tiny_repo, tmp_path / "copy", store=True)
    run([sys.executable, "-m", "stages.ingest"], root)
    assert sorted(p for p in (tiny_repo / "mlruns").rglob("*")) == original_files
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("lmforge")
    assert experiment.artifact_location == (root / "mlruns").resolve().as_uri()
    latest = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert (root / "mlruns" / latest.info.run_id / "artifacts" / "stats.json").is_file()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_checkpoint_on_a_full_disk_is_one_line_naming_it(tmp_path, capsys, async_save):
    """torch's writer says only "unexpected pos" when the disk fills: the stage says which checkpoint."""
    import torch

    from lmforge.core.stage import run_stage

    model = torch.nn.Linear(200, 200)
    optimizer = torch.optim.AdamW(model.parameters())
    with _mounted_tmpfs(tmp_path / "disk", "64k") as disk:
        manager = CheckpointManager(disk / "pretrain", 2, "me", async_save=async_save)

        def save() -> None:
            manager.save(1, model, optimizer, {})
            manager.wait()

        with pytest.raises(SystemExit) as stopped:
            run_stage("pretrain", save)
    line = capsys.readouterr().err.strip()
    assert stopped.value.code == 1 and line == (f"[pretrain] error: no space left on device writing "
                                                f"{disk / 'pretrain' / 'step_00000001'}: free space there and rerun the stage")


def test_a_full_disk_is_one_line_and_the_run_is_marked_failed(tiny_repo, tmp_path):
    root = _copy(tiny_repo, tmp_path / "repo", store=True, checkpoints=False)
    before = (root / "models/pretrain/model.safetensors").read_bytes()
    shutil.rmtree(root / "models")
    with _mounted_tmpfs(root / "models", "64k"):
        result = run([sys.executable, "-m", "stages.pretrain"], root, check=False)
        line = _one_line_no_traceback(result, "no space left on device writing")
        assert result.returncode == 1 and "models" in line
        assert not (root / "models/pretrain").exists() and not list((root / "models").glob(".pretrain*"))
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("lmforge").experiment_id
    latest = client.search_runs([experiment], "tags.`lmforge.stage` = 'pretrain'",
                                order_by=["attributes.start_time DESC"])[0]
    assert latest.info.status == "FAILED" and before
