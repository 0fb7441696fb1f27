"""The chunked cross-entropy: the loss and every gradient of the plain loss (fp32 tolerance), and
the whole (tokens, vocab) logits tensor never exists."""

from __future__ import annotations

import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.model.loss import IGNORE_INDEX, lm_loss
from lmforge.model.decoder import ModelConfig, Transformer

CONFIG = ModelConfig(vocab_size=512, dim=32, n_layers=1, n_heads=4, max_seq_len=32)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, CONFIG.vocab_size, (3, 25), generator=g)
    targets = x[:, 1:].clone()
    targets[0, :4] = IGNORE_INDEX  # ignored targets are skipped in both
    return {"inputs": x[:, :-1], "targets": targets}


def _loss_and_grads(chunk: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    loss, n = lm_loss(model, _batch(), loss_chunk=chunk)
    loss.backward()
    return loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}


def test_chunked_loss_and_gradients_equal_the_plain_ones():
    plain_loss, plain_n, plain_grads = _loss_and_grads(0)
    for chunk in (7, 24, 1000):  # not a divisor of the 72 tokens, one row, more than all tokens
        loss, n, grads = _loss_and_grads(chunk)
        assert n == plain_n == 72 - 4
        torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_as_large_as_the_full_logits_is_made_in_forward_or_backward():
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    batch = _batch()
    full_logits = batch["targets"].numel() * CONFIG.vocab_size
    sizes = {}
    for chunk in (0, 8):
        with _LargestTensor() as spy:
            loss, _ = lm_loss(copy.deepcopy(model), batch, loss_chunk=chunk)
            loss.backward()
        sizes[chunk] = spy.largest
    assert sizes[0] >= full_logits  # the spy sees the plain loss's logits
    # The chunked loss: nothing larger than one chunk's logits or the (vocab, dim) embedding and its grad.
    assert sizes[8] <= max(8 * CONFIG.vocab_size, CONFIG.vocab_size * CONFIG.dim) < full_logits
