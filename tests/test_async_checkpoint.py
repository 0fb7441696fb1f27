"""Async checkpoints: the state is captured when `save` returns (training may change the live
tensors), the next save waits for the previous write, and a process killed during a background
write leaves the previous checkpoint the newest loadable one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_helper import SyntheticRows, tiny_config  # noqa: E402

from lmforge.train.checkpoint import CheckpointManager  # noqa: E402
from lmforge.model.decoder import Transformer  # noqa: E402
from lmforge.core.params import TrainerParams  # noqa: E402
from lmforge.train.batches import PackedRows  # noqa: E402
from lmforge.train.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _pair(seed: int) -> tuple[Transformer, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Transformer(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    return model, opt


def test_async_save_keeps_the_state_of_the_moment_it_returned(tmp_path):
    model, opt = _pair(0)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    manager = CheckpointManager(tmp_path, async_save=True, owner="run")
    path = manager.save(1, model, opt, {"data_position": 8})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the next optimizer step, while the write may still run
    manager.wait()
    assert manager.latest() == path
    other, other_opt = _pair(1)
    assert manager.load(other, other_opt).extra["data_position"] == 8
    for name, value in other.state_dict().items():
        assert torch.equal(value, snapshot[name]), name


def test_async_training_writes_the_same_checkpoints_as_sync(tmp_path):
    def run(directory: Path, async_checkpoint: bool) -> Transformer:
        torch.manual_seed(0)
        cfg = TrainerParams(max_steps=4, micro_batch_size=4, warmup_steps=0, eval_every=0, eval_batches=1,
                            checkpoint_every=1, keep_checkpoints=2, progress=False, lr=3e-3)
        Trainer(Transformer(tiny_config()), cfg, PackedRows(SyntheticRows(32, 1)), checkpoint_dir=directory,
                async_checkpoint=async_checkpoint).fit()
        loaded = Transformer(tiny_config())
        assert CheckpointManager(directory).load(loaded, None).step == 4
        return loaded

    sync, background = run(tmp_path / "sync", False), run(tmp_path / "async", True)
    assert [p.name for p in CheckpointManager(tmp_path / "async").complete()] == ["step_00000003", "step_00000004"]
    for (name, a), b in zip(sync.state_dict().items(), background.state_dict().values()):
        assert torch.equal(a, b), name


VICTIM = textwrap.dedent("""
    import sys, time
    import torch
    sys.path.insert(0, "tests")
    import lmforge.train.checkpoint as ckpt
    from test_async_checkpoint import _pair
    model, opt = _pair(0)
    manager = ckpt.CheckpointManager(sys.argv[1], owner="run", async_save=True)
    manager.save(1, model, opt, {"data_position": 1})
    manager.wait()
    torch.save(model.state_dict(), sys.argv[1] + "/../step1_weights.pt")

    checksums = ckpt._checksums
    def stalled(directory):  # the background writer stops after the shards, before the commit
        print("WRITTEN", flush=True)
        time.sleep(120)
        return checksums(directory)
    ckpt._checksums = stalled
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    manager.save(2, model, opt, {"data_position": 2})
    print("TRAINING", flush=True)  # save returned: the training thread goes on
    time.sleep(120)
""")


def test_kill_during_a_background_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    root = tmp_path / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, str(root)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: set[str] = set()
    try:
        deadline = time.time() + 60
        while {"WRITTEN", "TRAINING"} - seen and time.time() < deadline:
            line = victim.stdout.readline()
            if not line:
                break
            seen.add(line.strip())
        assert {"WRITTEN", "TRAINING"} <= seen, f"the victim did not reach the background write: {seen}"
    finally:
        victim.kill()  # SIGKILL
        victim.wait(timeout=30)
    assert (root / "step_00000002.tmp").is_dir() and any((root / "step_00000002.tmp").glob("*.distcp"))
    manager = CheckpointManager(root, owner="run")
    assert [p.name for p in manager.complete()] == ["step_00000001"]
    model, opt = _pair(1)
    assert manager.load(model, opt).step == 1
    saved = torch.load(tmp_path / "step1_weights.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
