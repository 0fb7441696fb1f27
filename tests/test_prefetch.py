"""The prefetcher builds the next step's micro-batches in the background: same batches, same
order, same losses as building them in line, also across a resume."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_helper import SyntheticRows, tiny_config  # noqa: E402

from lmforge.train.batches import PackedRows, Prefetcher  # noqa: E402
from lmforge.model.decoder import Transformer  # noqa: E402
from lmforge.core.params import TrainerParams  # noqa: E402
from lmforge.train.trainer import Trainer  # noqa: E402


def _trainer(prefetch: bool, checkpoint_dir: Path | None = None) -> tuple[Trainer, dict[int, float]]:
    torch.manual_seed(0)
    cfg = TrainerParams(max_steps=6, micro_batch_size=4, grad_accum_steps=2, warmup_steps=1, eval_every=0,
                        eval_batches=1, checkpoint_every=3, progress=False, lr=3e-3)
    losses: dict[int, float] = {}
    trainer = Trainer(Transformer(tiny_config()), cfg, PackedRows(SyntheticRows(40, 1)), prefetch=prefetch,
                      checkpoint_dir=checkpoint_dir,
                      on_metrics=lambda step, m: losses.__setitem__(step, m["train_loss"]))
    return trainer, losses


def test_prefetched_batches_are_the_in_line_ones_in_the_same_order():
    trainer, _ = _trainer(prefetch=False)
    prefetcher = Prefetcher(trainer.host_micro_batches, pin=False)
    try:
        step = trainer.rows_per_step
        # 40 rows, 8 per step: positions cross epochs (a new permutation) on the way.
        for position in range(0, 12 * step, step):
            got = prefetcher.get(position, position + step)
            want = trainer.host_micro_batches(position)
            assert len(got) == len(want) == 2
            assert all(torch.equal(g[k], w[k]) for g, w in zip(got, want) for k in w)
        jumped = prefetcher.get(3 * step, None)  # not what was prefetched: built in line
        assert torch.equal(jumped[0]["inputs"], trainer.host_micro_batches(3 * step)[0]["inputs"])
    finally:
        prefetcher.close()


def test_same_losses_with_and_without_prefetch_and_across_a_resume(tmp_path):
    inline, expected = _trainer(prefetch=False)
    inline.fit()
    prefetched, got = _trainer(prefetch=True, checkpoint_dir=tmp_path)
    prefetched.fit()
    assert sorted(got) == list(range(1, 7)) and got == expected
    # Drop the final checkpoint: a new run resumes at step 3 and prefetches from there.
    shutil.rmtree(tmp_path / "step_00000006")
    resumed, after = _trainer(prefetch=True, checkpoint_dir=tmp_path)
    resumed.fit()
    assert sorted(after) == [4, 5, 6] and all(after[s] == expected[s] for s in after)


def test_the_row_sampler_gives_each_thread_its_epochs_rows():
    # The prefetch thread and an in-line build may read one sampler at once, across an epoch
    # boundary; numpy's shuffle releases the GIL, so a sampler that recorded the new epoch before
    # its permutation was ready handed the other thread the old epoch's rows.
    import threading

    from lmforge.train.batches import RowSampler

    n = 100_000  # a shuffle long enough for the other thread to run inside it
    sampler, reference = RowSampler(n, seed=3), RowSampler(n, seed=3)
    want = {epoch: reference.rows(epoch * n + n - 10, 10) for epoch in (0, 1)}
    wrong: list[int] = []
    start = threading.Barrier(2)

    def read(epochs: tuple[int, int]) -> None:
        start.wait()
        for _ in range(200):
            for epoch in epochs:
                if sampler.rows(epoch * n + n - 10, 10) != want[epoch]:
                    wrong.append(epoch)

    threads = [threading.Thread(target=read, args=(epochs,)) for epochs in ((0, 1), (1, 0))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong
