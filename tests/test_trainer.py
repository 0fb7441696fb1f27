"""Behavior of the training loop: steps learn, accumulation is exact, precisions run, data and resume are exact."""

from __future__ import annotations

import copy
import io
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import HELPER, REPO, helper_env, helper_losses  # noqa: E402
from train_helper import SyntheticRows, tiny_config  # noqa: E402

from lmforge.core.errors import LmforgeError  # noqa: E402
from lmforge.model.decoder import ModelConfig, Transformer  # noqa: E402
from lmforge.core.params import TrainerParams  # noqa: E402
from lmforge.train.batches import PackedRows, RowSampler  # noqa: E402
from lmforge.train.optim import lr_at  # noqa: E402
from lmforge.train.trainer import Trainer  # noqa: E402



def make_trainer(model=None, **kw) -> Trainer:
    torch.manual_seed(0)
    model = model or Transformer(tiny_config())
    cfg = TrainerParams(**{"max_steps": 4, "micro_batch_size": 4, "warmup_steps": 0, "eval_every": 0,
                         "eval_batches": 2, "checkpoint_every": 0, "progress": False, "lr": 3e-3, **kw})
    return Trainer(model, cfg, PackedRows(SyntheticRows(128, 1), SyntheticRows(32, 2)))


def test_validation_and_evaluate_report_the_same_loss_and_perplexity_even_past_e50():
    """One loss-over-rows loop: the trainer's val figures and evaluate's on the same rows agree,
    also for a diverged model (a loss past 50 nats: its perplexity is exp(loss), not a cap)."""
    from lmforge.evaluate.metrics import language_model_loss

    trainer = make_trainer()
    with torch.no_grad():
        trainer.model.norm.weight.mul_(1000.0)  # logits x1000: confidently wrong
    val = trainer.evaluate()
    rows = trainer.cfg.eval_batches * trainer.cfg.micro_batch_size
    scored = language_model_loss(trainer.model, trainer.val_data, trainer.cfg.micro_batch_size, max_rows=rows)
    assert val["val_loss"] > 50
    assert val["val_loss"] == pytest.approx(scored["loss"], rel=1e-6)
    assert val["val_ppl"] == pytest.approx(scored["perplexity"], rel=1e-5)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stream", "drawn"), [(_Terminal, True), (io.StringIO, False)], ids=["terminal", "log"])
def test_the_progress_bar_is_drawn_on_a_terminal_and_never_into_a_log(monkeypatch, stream, drawn):
    """A bar redrawn into a pipe or file (`dvc repro > log`, a Prefect worker) is a log full of CR frames."""
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    make_trainer(progress=True).fit()
    assert ("train: 100%" in err.getvalue()) is drawn and ("\r" in err.getvalue()) is drawn


def test_one_optimizer_step_reduces_the_loss_on_a_fixed_batch():
    trainer = make_trainer()
    batches = list(trainer.train_micro_batches(0))
    before, _ = trainer.compute_gradients(batches)
    trainer.optimizer_step()
    after, _ = trainer.compute_gradients(batches)
    assert after < before


def test_accumulating_four_micro_batches_of_two_equals_one_batch_of_eight():
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    small = make_trainer(copy.deepcopy(model), micro_batch_size=2, grad_accum_steps=4)
    large = make_trainer(copy.deepcopy(model), micro_batch_size=8, grad_accum_steps=1)
    loss_a, tokens_a = small.compute_gradients(small.train_micro_batches(0))
    loss_b, tokens_b = large.compute_gradients(large.train_micro_batches(0))
    assert tokens_a == tokens_b == 8 * 16
    assert math.isclose(loss_a, loss_b, rel_tol=1e-6)
    for (name, a), b in zip(small.model.named_parameters(), large.model.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_each_precision_trains_on_cpu(precision):
    seen = []
    trainer = make_trainer(precision=precision, max_steps=3)
    trainer.on_metrics = lambda step, m: seen.append((step, m))
    result = trainer.fit()
    assert result.step == 3 and [s for s, _ in seen] == [1, 2, 3]
    assert all(math.isfinite(m["train_loss"]) for _, m in seen)
    assert result.val_loss is not None and math.isfinite(result.val_loss)


def test_metrics_cover_loss_lr_grad_norm_throughput_and_memory():
    seen = []
    trainer = make_trainer(max_steps=2)
    trainer.on_metrics = lambda step, m: seen.append(m)
    trainer.fit()
    assert {"train_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_mib", "val_loss", "val_ppl"} <= set(seen[-1])
    assert seen[-1]["mfu"] is None  # no peak FLOPs for a CPU
    assert seen[-1]["peak_mem_mib"] > 0


def test_token_budget_caps_the_number_of_steps():
    trainer = make_trainer(max_steps=100, max_tokens=3 * 4 * 16)
    assert trainer.total_steps == 3


def test_ranks_read_disjoint_rows_and_see_every_row_once_per_epoch():
    n, world, micro = 50, 2, 5
    sampler = RowSampler(n, seed=3)
    seen = []
    for step in range(n // (world * micro)):
        for rank in range(world):
            seen += sampler.rows(step * world * micro + rank * micro, micro)
    assert sorted(seen) == list(range(n))
    assert sampler.rows(0, n) != sampler.rows(n, n)  # a new shuffle each epoch
    assert sorted(sampler.rows(n, n)) == list(range(n))


def test_the_ranks_of_a_tensor_parallel_group_read_the_same_rows_and_groups_disjoint_ones():
    from lmforge.train.distributed import DistInfo

    cfg = TrainerParams(max_steps=2, micro_batch_size=4, grad_accum_steps=2, warmup_steps=0, progress=False)
    rows = {}
    for rank in range(4):  # FSDP 2 x TP 2: ranks 0-1 form TP group 0, ranks 2-3 group 1
        info = DistInfo(rank=rank, world_size=4, local_rank=rank, device=torch.device("cpu"), is_main=rank == 0,
                        tensor_parallel=2)
        trainer = Trainer(Transformer(tiny_config()), cfg, PackedRows(SyntheticRows(64, 1)), dist_info=info)
        assert trainer.rows_per_step == 4 * 2 * 2  # micro x accum x data-parallel groups
        rows[rank] = [b["inputs"].tolist() for b in trainer.host_micro_batches(0)]
    assert rows[0] == rows[1] and rows[2] == rows[3]
    shared = {tuple(r) for b in rows[0] for r in b} & {tuple(r) for b in rows[2] for r in b}
    assert not shared


def test_lr_warms_up_then_decays_to_min_lr():
    cfg = TrainerParams(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100)
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)
    assert lr_at(9, cfg, 100) == pytest.approx(1.0)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    assert lr_at(40, cfg, 100) > lr_at(60, cfg, 100)


def test_the_code_defaults_are_the_ones_params_yaml_states():
    """One set of defaults: the typed params declare them, params.yaml states the same values."""
    from lmforge.core.params import Params, load_params

    assert Params() == load_params(REPO / "params.yaml")


def test_too_little_data_for_one_step_is_an_error_naming_the_fix():
    with pytest.raises(LmforgeError, match="nproc"):
        make_trainer(micro_batch_size=64, grad_accum_steps=4)


def test_rows_longer_than_max_seq_len_are_an_error():
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, max_seq_len=8))
    with pytest.raises(LmforgeError, match="max_seq_len"):
        make_trainer(model)


def test_a_vocabulary_larger_than_the_embedding_is_an_error():
    model = Transformer(ModelConfig(vocab_size=32, dim=32, n_layers=1, n_heads=4, max_seq_len=16))
    with pytest.raises(LmforgeError, match="vocab_size"):
        make_trainer(model)


def _run_helper(out: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HELPER), str(out), *args], cwd=REPO, env=helper_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def test_resume_after_kill_continues_the_same_loss_curve(tmp_path, helper_runs):
    # The uninterrupted curve: conftest.helper_runs' `one`, the same 12 steps (checkpoints every 4 steps
    # there, every 3 here: saving one reads the state and changes none of it).
    common = ["--steps", "12", "--ckpt-every", "3"]
    victim = _run_helper(tmp_path / "run", *common, "--delay", "0.3")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = len(metrics.read_text().splitlines())
    assert killed_at < 12, "the run finished before it could be killed"

    resumed = _run_helper(tmp_path / "run", *common)
    output = resumed.communicate(timeout=120)[0].decode()
    assert resumed.returncode == 0, output
    lines = metrics.read_text().splitlines()
    first_resumed_step = json.loads(lines[killed_at])["step"]
    assert 1 < first_resumed_step <= killed_at, "the second run started over instead of resuming"
    expected, got = helper_losses(helper_runs["one"]), helper_losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 13))
    # CPU fp32, one thread, deterministic algorithms: the continued curve is bitwise the same.
    assert got == expected
