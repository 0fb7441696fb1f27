"""The CUDA path as users run it: the pretrain stage in bf16 with compile (document masks, chunked
loss, async checkpoints), fp16 with the grad scaler, FSDP2 over NCCL under torchrun, kill -9 and
resume, export and reload, LoRA fine-tuning. Skipped without a GPU (tests/gpu/conftest.py)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_PARAMS, run, tool_env

HELPER = Path(__file__).resolve().parents[1] / "train_helper.py"
# bf16 on CUDA: the resumed curve matches the uninterrupted one to this relative tolerance (the
# kernels are deterministic where torch has a deterministic variant, not bitwise everywhere).
RESUME_RTOL = 1e-3
CUDA_PRETRAIN = {**TINY_PARAMS["pretrain"], "precision": "bf16", "document_mask": True}
CUDA_RUNTIME = {"pretrain": {**TINY_PARAMS["runtime"]["pretrain"], "compile": True, "loss_chunk_tokens": 64,
                             "async_checkpoint": True}}


def _set(root: Path, section: str, values: dict) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section] = {**params[section], **values}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def cuda_pretrained(data_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cuda") / "repo"
    shutil.copytree(data_repo, root, ignore=shutil.ignore_patterns("mlflow.db", "mlruns", "checkpoints"), symlinks=True)
    _set(root, "pretrain", CUDA_PRETRAIN)
    _set(root, "runtime", CUDA_RUNTIME)
    run(["python", "-m", "stages.pretrain"], root)
    return root


def test_pretrain_stage_in_bf16_with_compile_learns_and_checkpoints(cuda_pretrained):
    metrics = json.loads((cuda_pretrained / "reports/pretrain/metrics.json").read_text())
    vocab = json.loads((cuda_pretrained / "data/shards/manifest.json").read_text())["vocab_size"]
    assert metrics["steps"] == CUDA_PRETRAIN["max_steps"]
    assert metrics["val_loss"] < math.log(vocab) - 0.3
    # The async writer committed both kept checkpoints before the stage exported.
    names = sorted(p.name for p in (cuda_pretrained / "checkpoints/pretrain").glob("step_*"))
    assert names == ["step_00000003", "step_00000006"]


def test_export_reloads_and_the_hf_export_gives_the_same_logits_on_cuda(cuda_pretrained):
    from transformers import LlamaForCausalLM

    from lmforge.model.export import load_pretrained

    ours, _ = load_pretrained(cuda_pretrained / "models/pretrain", device="cuda")
    theirs = LlamaForCausalLM.from_pretrained(cuda_pretrained / "models/pretrain_hf").to("cuda").eval()
    idx = torch.randint(0, 300, (2, 16), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours.eval()(idx), atol=1e-3, rtol=1e-3)


def test_lora_fine_tuning_on_cuda(cuda_pretrained, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(cuda_pretrained, root, ignore=shutil.ignore_patterns("mlflow.db", "mlruns", "checkpoints"),
                    symlinks=True)
    _set(root, "finetune", {"task": "sft", "method": "lora", "train_file": "data/labeled/sft_train.jsonl",
                            "test_file": "data/labeled/sft_test.jsonl", "max_steps": 3, "eval_every": 3,
                            "precision": "bf16"})
    run(["python", "-m", "stages.finetune"], root)
    metrics = json.loads((root / "reports/finetune/metrics.json").read_text())
    assert 0 < metrics["trainable_params"] < metrics["total_params"] / 4 and metrics["best_val_loss"] > 0
    assert (root / "models/finetune/adapter/adapter_model.safetensors").is_file()


def _helper(out: Path, *args: str, torchrun: bool = False) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] \
        if torchrun else [sys.executable]
    env = tool_env(CUBLAS_WORKSPACE_CONFIG=":4096:8")
    env.pop("RANK", None)
    return subprocess.Popen([*launcher, str(HELPER), str(out), "--device", "cuda", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows}


def _finish(process: subprocess.Popen, timeout: float = 300) -> None:
    output = process.communicate(timeout=timeout)[0].decode()
    assert process.returncode == 0, output


def test_fp16_with_the_grad_scaler_learns(tmp_path):
    _finish(_helper(tmp_path, "--precision", "fp16", "--steps", "12"))
    losses = _losses(tmp_path)
    assert all(math.isfinite(v) for v in losses.values()) and losses[12] < losses[1]


def test_torchrun_one_process_fsdp2_over_nccl_with_compile(tmp_path):
    _finish(_helper(tmp_path, "--precision", "bf16", "--compile", "--steps", "8", torchrun=True))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["step"] == 8 and math.isfinite(result["val_loss"])
    assert (tmp_path / "checkpoints/step_00000008").is_dir()


def test_kill_and_resume_continue_the_same_bf16_curve(tmp_path):
    common = ["--precision", "bf16", "--steps", "12", "--ckpt-every", "3", "--async-checkpoint"]
    _finish(_helper(tmp_path / "ref", *common))
    victim = _helper(tmp_path / "run", *common, "--delay", "0.5")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 7):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert len(metrics.read_text().splitlines()) < 12, "the run finished before it could be killed"
    _finish(_helper(tmp_path / "run", *common))
    expected, got = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 13))
    worst = max(abs(got[s] - expected[s]) / abs(expected[s]) for s in expected)
    print(f"resume on CUDA bf16: largest relative loss difference {worst:.2e}")
    assert worst <= RESUME_RTOL
