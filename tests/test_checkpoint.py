"""Behavior of checkpoints: a full round trip, RNG restored, last K kept, bad ones skipped with a clear warning."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_helper import tiny_config  # noqa: E402

from lmforge.train.checkpoint import CheckpointManager  # noqa: E402
from lmforge.core.errors import LmforgeError  # noqa: E402
from lmforge.model.decoder import Transformer  # noqa: E402


def trained_pair(seed: int = 0) -> tuple[Transformer, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Transformer(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 64, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    opt.step()
    return model, opt


def test_save_then_load_restores_model_optimizer_extra_and_rng(tmp_path):
    model, opt = trained_pair(0)
    manager = CheckpointManager(tmp_path)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    manager.save(5, model, opt, {"data_position": 40})
    draws = (random.random(), np.random.rand(), torch.rand(1).item())

    other, other_opt = trained_pair(1)
    restored = manager.load(other, other_opt)
    assert restored.step == 5 and restored.extra["data_position"] == 40
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


def test_only_the_last_k_are_kept_and_unfinished_saves_are_ignored(tmp_path):
    model, opt = trained_pair()
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        manager.save(step, model, opt, {})
    (tmp_path / "step_00000009.tmp").mkdir()  # a save killed before its rename
    assert [p.name for p in manager.complete()] == ["step_00000002", "step_00000003"]
    assert manager.latest().name == "step_00000003"


def test_a_corrupt_checkpoint_is_named_and_the_previous_one_is_used(tmp_path):
    model, opt = trained_pair()
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, model, opt, {})
    manager.save(2, model, opt, {})
    for f in (tmp_path / "step_00000002").glob("*.distcp"):
        f.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="step_00000002 could not be loaded"):
        restored = manager.load(*trained_pair(1))
    assert restored.step == 1


def test_no_loadable_checkpoint_is_an_error_and_none_at_all_is_none(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt")
    assert manager.load(*trained_pair()) is None
    model, opt = trained_pair()
    manager.save(1, model, opt, {})
    (tmp_path / "ckpt" / "step_00000001" / ".metadata").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(LmforgeError, match="could be loaded"):
        manager.load(model, opt)
