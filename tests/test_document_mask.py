"""Document-masked packing: attention never crosses an EOS, rotary positions restart at each
document, and with the mask off the model runs exactly the causal path it always ran."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from train_helper import SyntheticRows, tiny_config  # noqa: E402

from lmforge.model.attention import document_positions  # noqa: E402
from lmforge.train.batches import DocumentCollate, PackedRows, document_segments, lm_collate  # noqa: E402
from lmforge.model.decoder import Transformer  # noqa: E402
from lmforge.core.params import TrainerParams  # noqa: E402
from lmforge.train.trainer import Trainer  # noqa: E402

EOS = 0


def _row() -> torch.Tensor:
    # document 1: positions 0..5 (its EOS at 5); document 2: 6..11 (EOS at 11); document 3: 12..15
    ids = torch.tensor([[5, 9, 13, 21, 7, EOS, 33, 2, 40, 8, 11, EOS, 17, 3, 50, 6]])
    return ids


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config()).eval()


def test_segments_count_the_eos_before_each_token_and_positions_restart_after_each_eos():
    ids = _row().numpy()
    segments = document_segments(ids, EOS)
    assert segments.tolist() == [[0] * 6 + [1] * 6 + [2] * 4]
    positions = document_positions(torch.from_numpy(segments))
    assert positions.tolist() == [list(range(6)) + list(range(6)) + list(range(4))]


def test_changing_a_token_of_document_1_changes_no_logit_of_document_2():
    model, ids = _model(), _row()
    segments = torch.from_numpy(document_segments(ids.numpy(), EOS))
    changed = ids.clone()
    changed[0, 2] = 60
    with torch.no_grad():
        a, b = model(ids, segments=segments), model(changed, segments=segments)
    assert not torch.equal(a[0, 2:6], b[0, 2:6])  # document 1 itself does change
    assert torch.equal(a[0, 6:], b[0, 6:])


def test_a_document_in_a_packed_row_gets_the_logits_it_gets_alone_in_a_row():
    model, ids = _model(), _row()
    segments = torch.from_numpy(document_segments(ids.numpy(), EOS))
    with torch.no_grad():
        packed = model(ids, segments=segments)
        alone = model(ids[:, 6:12])  # plain causal attention from position 0
    torch.testing.assert_close(packed[0, 6:12], alone[0], rtol=1e-5, atol=1e-5)


def test_without_document_mask_the_batch_has_no_segments_and_attention_is_the_plain_causal_call(monkeypatch):
    rows = [SyntheticRows(2, 0)[i] for i in range(2)]
    batch = lm_collate(rows)
    assert set(batch) == {"inputs", "targets"}
    calls = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        _model()(batch["inputs"])
    assert calls and all(c == {"is_causal": True} for c in calls)


def test_training_with_document_masks_runs_and_rows_without_eos_match_the_causal_losses():
    # SyntheticRows hold ids 0..63; EOS 64 never occurs, so every row is one document and the
    # document mask equals the causal one (up to kernel rounding).
    def losses(collate) -> list[float]:
        torch.manual_seed(0)
        cfg = TrainerParams(max_steps=3, micro_batch_size=4, warmup_steps=0, eval_every=0, eval_batches=1,
                            checkpoint_every=0, progress=False, lr=3e-3)
        out: list[float] = []
        trainer = Trainer(Transformer(tiny_config()), cfg, PackedRows(SyntheticRows(64, 1), None, collate),
                          on_metrics=lambda step, m: out.append(m["train_loss"]))
        trainer.fit()
        return out

    plain, masked = losses(lm_collate), losses(DocumentCollate(eos_id=64))
    assert len(masked) == 3 and np.allclose(plain, masked, rtol=1e-5, atol=1e-6)
