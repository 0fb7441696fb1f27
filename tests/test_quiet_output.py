"""A first run says what matters and nothing else: no library warning in any stage's output (the
tiny pipeline's `dvc repro`, recorded by conftest's tiny_repo), the validation loss at each
evaluation, counts people can read; `make repro` (what `make run` runs) without DVC's push hint when
there is no remote; the servers the README starts (`make ui`, `make prefect-server`) with telemetry
off, `make ui` on the store the stages use."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import TELEMETRY_OFF
from lmforge.track.ui import run_link

from conftest import REPO, REPRO_OUTPUT, copy_repo, tool_env

# What a library prints when it warns (Python warnings, MLflow's model-logging and registry notes,
# DVC's closing hint), and our own warning about a device a CPU never has.
NOISE = ("Warning", "warn(", "pickle", "Failed to validate", "already exists", "dvc push", "MFU not reported")


def _noise(output: str) -> list[str]:
    return [line for line in output.splitlines() if any(word in line for word in NOISE)]


@pytest.fixture(scope="module")
def repro_output(tiny_repo: Path) -> str:
    return (tiny_repo / REPRO_OUTPUT).read_text(encoding="utf-8")


def test_no_stage_prints_a_library_warning(repro_output):
    stages = re.findall(r"Running stage '(\w+)'", repro_output)
    assert len(stages) == 8, stages
    # DVC's own closing "Use `dvc push`" line is `make repro`'s to drop (test below), not a stage's.
    assert [line for line in _noise(repro_output) if not line.startswith("Use `dvc push`")] == []


def test_training_logs_the_validation_loss_at_each_evaluation(repro_output):
    # tiny params: pretrain 6 steps, eval every 3; finetune 4 steps, eval every 2 (classify: accuracy too)
    for stage, steps in (("pretrain", ("3/6", "6/6")), ("finetune", ("2/4", "4/4"))):
        for step in steps:
            assert re.search(rf"\[{stage}\] INFO step {step}: val_loss \d+\.\d{{4}} \(train_loss \d+\.\d{{4}}\)",
                             repro_output), (stage, step)
    assert re.search(r"\[finetune\] INFO step 2/4: val_loss .*, val_accuracy \d\.\d{4}", repro_output)
    assert "val_ppl" not in repro_output  # no perplexity of a classification loss


def test_parameter_counts_print_with_thousands_separators(repro_output):
    assert re.search(r"\[finetune\] INFO .*\(\d{1,3}(,\d{3})+ of \d{1,3}(,\d{3})+ params trained\)", repro_output)


def test_make_repro_without_a_remote_prints_no_push_hint_and_no_warning(tiny_repo, tmp_path):
    repo = copy_repo(tiny_repo, tmp_path / "repo")
    result = subprocess.run(["make", "-s", "repro", f"BIN={Path(sys.executable).parent}"], cwd=repo,
                            env=tool_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Running stage 'promote'" in result.stdout  # always changed: it runs, and DVC would end with the hint
    assert _noise(result.stdout + result.stderr) == []


# ------------------------------------------------------------- the servers the README starts


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A venv stand-in for the Makefile: `python` (set-up already done) and `mlflow`/`prefect`
    that record their arguments and environment instead of serving."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "mlflow", "prefect"):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "$*" > {tmp_path}/{name}.args\nenv > {tmp_path}/{name}.env\n')
        script.chmod(0o755)
    return bin_dir


def _make(target: str, fake_bin: Path, **env: str) -> tuple[str, str, dict[str, str]]:
    """Run `make <target>` from this repository with `fake_bin` as its venv; (output, the server's
    arguments, its environment)."""
    venv = fake_bin.parent
    torch = "torch==0"
    stamp = subprocess.run(["sh", "-c", "cksum < pyproject.toml"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    (venv / ".installed").write_text(f"{torch} {stamp}\n")
    clean = {k: v for k, v in os.environ.items() if k not in TELEMETRY_OFF and not k.startswith("MLFLOW_")}
    result = subprocess.run(["make", "-s", target, f"VENV={venv}", f"BIN={fake_bin}", f"TORCH={torch}"], cwd=REPO,
                            env={**clean, **env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    server = "mlflow" if target == "ui" else "prefect"
    root = venv.parent
    seen = dict(line.split("=", 1) for line in (root / f"{server}.env").read_text().splitlines() if "=" in line)
    return result.stdout, (root / f"{server}.args").read_text().strip(), seen


@pytest.mark.parametrize("target", ["ui", "prefect-server"])
def test_the_servers_the_readme_starts_run_with_telemetry_off(target, fake_bin):
    _, _, seen = _make(target, fake_bin)
    assert {key: seen.get(key) for key in TELEMETRY_OFF} == TELEMETRY_OFF


def test_make_ui_serves_and_names_the_tracking_uri_in_use(fake_bin, tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path}/elsewhere.db"
    output, args, _ = _make("ui", fake_bin, MLFLOW_TRACKING_URI=store)
    assert f"--backend-store-uri {store}" in args and store in output
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert f"--backend-store-uri {store})" in run_link("1", "0123abcd")  # the hint each stage prints
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert "--backend-store-uri sqlite:///mlflow.db)" in run_link("1", "0123abcd")


def test_the_readme_starts_prefect_through_the_makefile():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "make prefect-server" in readme and "prefect server start" not in readme
