import pytest

from lmforge.errors import LmforgeError
from lmforge.params import PretrainParams
from lmforge.resume import claim_run_dir, remember_run_id, result_knobs


def test_same_fingerprint_keeps_checkpoints_and_returns_the_mlflow_run(tmp_path):
    root = tmp_path / "ckpt"
    assert claim_run_dir(root, {"a": 1}, "auto") is None
    remember_run_id(root, "run-1")
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
    remember_run_id(root, "run-1")
    assert claim_run_dir(root, {"a": 1}, "never") is None


def test_foreign_files_are_not_touched(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "mine.txt").write_text("x")
    with pytest.raises(LmforgeError, match="without a run.json"):
        claim_run_dir(root, {}, "auto")


def test_execution_knobs_do_not_invalidate_checkpoints():
    a = PretrainParams(checkpoint_every=10, progress=False, compile=True)
    b = PretrainParams(checkpoint_every=20, progress=True, compile=False)
    assert result_knobs(a) == result_knobs(b)
    assert result_knobs(PretrainParams(max_steps=5)) != result_knobs(PretrainParams(max_steps=6))
