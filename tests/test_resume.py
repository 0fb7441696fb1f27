import pytest

from lmforge.core.errors import LmforgeError
from lmforge.core.params import FinetuneParams, PretrainParams, PretrainRuntime
from lmforge.train.resume import claim_run_dir, remember_run_key, result_knobs


def test_same_fingerprint_keeps_checkpoints_and_returns_the_runs_tracking_key(tmp_path):
    root = tmp_path / "ckpt"
    assert claim_run_dir(root, {"a": 1}, "auto") is None
    remember_run_key(root, "run-1")
    (root / "step_00000002").mkdir()
    assert claim_run_dir(root, {"a": 1}, "auto") == "run-1"
    assert (root / "step_00000002").is_dir()


def test_changed_fingerprint_moves_checkpoints_aside(tmp_path, caplog):
    root = tmp_path / "ckpt"
    claim_run_dir(root, {"p": {"lr": 1.0}}, "auto")
    (root / "step_00000002").mkdir()
    assert claim_run_dir(root, {"p": {"lr": 2.0}}, "auto") is None
    assert "p.lr changed" in caplog.text
    assert (tmp_path / "ckpt.stale" / "step_00000002").is_dir() and not (root / "step_00000002").exists()


def test_resume_never_starts_fresh(tmp_path):
    root = tmp_path / "ckpt"
    claim_run_dir(root, {"a": 1}, "auto")
    remember_run_key(root, "run-1")
    assert claim_run_dir(root, {"a": 1}, "never") is None


def test_foreign_files_are_not_touched(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "mine.txt").write_text("x")
    with pytest.raises(LmforgeError, match="without a run.json"):
        claim_run_dir(root, {}, "auto")


def test_the_test_file_does_not_invalidate_checkpoints_and_a_result_knob_does():
    # Run-time knobs (checkpoints, progress, compile, nproc) are not in a stage's section at all:
    # they live in `runtime:` (RuntimeParams), so they never reach the fingerprint.
    assert not set(PretrainRuntime.model_fields) & set(PretrainParams.model_fields)
    assert result_knobs(FinetuneParams(test_file="a.jsonl")) == result_knobs(FinetuneParams(test_file="b.jsonl"))
    assert result_knobs(PretrainParams(max_steps=5)) != result_knobs(PretrainParams(max_steps=6))


def test_a_linked_checkpoint_directory_stays_a_link_through_every_change_of_params(tmp_path):
    """Checkpoints on a big disk through a symlink: stale ones move aside on that disk, the link stays."""
    disk = tmp_path / "disk"
    disk.mkdir()
    root = tmp_path / "checkpoints" / "pretrain"
    root.parent.mkdir()
    root.symlink_to(disk / "pretrain", target_is_directory=True)
    for lr in (1.0, 2.0, 3.0):
        assert claim_run_dir(root, {"p": {"lr": lr}}, "auto") is None
        (root / f"step_{int(lr):08d}").mkdir()
        assert root.is_symlink() and (disk / "pretrain" / "run.json").is_file()
    assert sorted(p.name for p in (disk / "pretrain").iterdir()) == ["run.json", "step_00000003"]
    assert (disk / "pretrain.stale" / "step_00000002").is_dir()  # the previous run's, on the same disk
    assert not (tmp_path / "checkpoints" / "pretrain.stale").exists()


def test_a_dangling_link_is_followed_when_its_disk_is_there_and_named_when_not(tmp_path):
    root = tmp_path / "ckpt"
    root.symlink_to(tmp_path / "disk" / "ckpt")
    with pytest.raises(LmforgeError, match=f"{root} links to {tmp_path / 'disk' / 'ckpt'}, whose directory"):
        claim_run_dir(root, {"a": 1}, "auto")
    (tmp_path / "disk").mkdir()
    assert claim_run_dir(root, {"a": 1}, "auto") is None
    assert root.is_symlink() and (tmp_path / "disk" / "ckpt" / "run.json").is_file()


def test_a_checkpoint_path_that_is_a_file_is_one_clear_error(tmp_path):
    root = tmp_path / "ckpt"
    root.write_text("not a directory")
    with pytest.raises(LmforgeError, match="is not a directory"):
        claim_run_dir(root, {"a": 1}, "auto")
