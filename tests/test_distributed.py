"""Behavior under torchrun: two FSDP2 ranks over gloo train like one process, and their checkpoint
resumes at world size 1; plus the single-process defaults of lmforge.train.distributed."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

from train_helper import SyntheticRows, tiny_config  # noqa: E402

from lmforge.core.errors import LmforgeError  # noqa: E402
from lmforge.model.decoder import Transformer  # noqa: E402
from lmforge.train.distributed import apply_activation_checkpointing, apply_fsdp, init_distributed  # noqa: E402
from lmforge.core.params import TrainerParams  # noqa: E402
from lmforge.train.batches import PackedRows  # noqa: E402
from lmforge.train.trainer import Trainer  # noqa: E402

HELPER = Path(__file__).parent / "train_helper.py"
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(args: list[str]) -> None:
    done = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _losses(path: Path) -> dict[int, float]:
    return {row["step"]: row["train_loss"] for row in map(json.loads, path.read_text().splitlines())}


def test_two_fsdp_ranks_train_checkpoint_and_resume_at_world_size_one(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    # Same global batch (8 rows) both ways: 2 ranks x 4 rows, or 1 process x 4 rows x 2 micro-steps.
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          str(HELPER), str(two), "--steps", "12", "--micro", "4", "--accum", "1"])
    _run([sys.executable, str(HELPER), str(one), "--steps", "12", "--micro", "4", "--accum", "2"])
    ref, fsdp = _losses(one / "metrics.jsonl"), _losses(two / "metrics.jsonl")
    assert sorted(fsdp) == list(range(1, 13))
    for step, loss in fsdp.items():
        # Not bitwise: the ranks' gradient reduction sums in a different order than one process.
        assert loss == pytest.approx(ref[step], rel=1e-5), step
    latest = two / "checkpoints" / "step_00000012"
    assert sorted(p.name for p in latest.glob("rng_rank*.json")) == ["rng_rank0.json", "rng_rank1.json"]

    # Load the two-rank checkpoint in this (single, group-less) process: the full state is the same.
    torch.manual_seed(123)
    model = Transformer(tiny_config())
    cfg = TrainerParams(max_steps=12, micro_batch_size=4, grad_accum_steps=2, progress=False)
    trainer = Trainer(model, cfg, PackedRows(SyntheticRows(256, 1)), checkpoint_dir=two / "checkpoints")
    assert trainer.maybe_resume() == latest
    assert trainer.step == 12 and trainer.data_position == 96
    saved = load_file(str(two / "model" / "model.safetensors"))
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert all(float(s["step"]) == 12 for s in trainer.optimizer.state.values())

    # From the step-8 checkpoint, training continues at world size 1 on the one-process curve.
    shutil.rmtree(latest)
    _run([sys.executable, str(HELPER), str(two), "--steps", "12", "--micro", "4", "--accum", "2"])
    resumed = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()[12:]]
    assert [row["step"] for row in resumed] == [9, 10, 11, 12]
    for row in resumed:
        assert row["train_loss"] == pytest.approx(ref[row["step"]], rel=1e-5), row["step"]


def test_without_torchrun_there_is_one_rank_and_no_process_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    info = init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    with pytest.raises(LmforgeError, match="torchrun"):
        apply_fsdp(Transformer(tiny_config()))


def test_activation_checkpointing_keeps_names_loss_and_gradients():
    torch.manual_seed(0)
    plain = Transformer(tiny_config())
    wrapped = apply_activation_checkpointing(copy.deepcopy(plain))
    x = torch.randint(0, 64, (2, 16))
    _, loss_a = plain(x, x)
    _, loss_b = wrapped(x, x)
    loss_a.backward()
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(plain.parameters(), wrapped.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-7)
    from lmforge.train.export import full_state_dict

    assert set(full_state_dict(wrapped)) == set(plain.state_dict())
