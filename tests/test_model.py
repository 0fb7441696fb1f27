"""Behavior of the decoder and of generation: shapes, causality, presets, KV cache, sampling."""

from __future__ import annotations

import pytest
import torch

from lmforge.core.errors import LmforgeError
from lmforge.model.generate import filter_logits, generate
from lmforge.model.decoder import PRESETS, ModelConfig, Transformer, build_config


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{"vocab_size": 97, "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32, **kw}))


def test_forward_gives_logits_and_loss_of_the_right_shape():
    model = tiny()
    x, targets = torch.randint(0, 97, (3, 10)), torch.randint(0, 97, (3, 10))
    logits, loss = model(x, targets)
    assert logits.shape == (3, 10, 97)
    assert loss.shape == () and abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.3  # ~uniform at init


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = tiny(n_kv_heads=2)
    x = torch.randint(0, 97, (1, 12))
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % 97
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_ignored_targets_do_not_count_in_the_loss():
    model = tiny()
    x = torch.randint(0, 97, (2, 8))
    t = x.clone()
    t[:, :4] = -100
    logits, loss = model(x, t)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 97), x[:, 4:].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_tied_embeddings_share_one_tensor_and_param_count_matches_config():
    for tie in (True, False):
        model = tiny(tie_embeddings=tie, n_kv_heads=2)
        assert (model.output.weight is model.embed.weight) == tie
        assert model.num_params() == model.config.num_params()


def test_every_preset_builds_the_parameter_count_its_config_states():
    """config.num_params() is what flops and reports use before a model exists: every preset's built
    model has exactly that many (built on the meta device: no memory, no time)."""
    for name in PRESETS:
        config = build_config(name, vocab_size=128256)
        with torch.device("meta"):
            model = Transformer(config)
        assert sum(p.numel() for p in model.parameters()) == config.num_params(), name


def test_config_round_trips_and_rejects_bad_values():
    cfg = ModelConfig(vocab_size=50, n_kv_heads=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(LmforgeError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(LmforgeError, match="unknown model preset"):
        build_config("huge")
    with pytest.raises(LmforgeError, match="unknown keys"):
        ModelConfig.from_dict({"dimension": 3})
    with pytest.raises(LmforgeError, match="vocab_size"):
        cfg.check_vocab(51)


def test_a_sequence_longer_than_max_seq_len_is_an_error():
    with pytest.raises(LmforgeError, match="max_seq_len"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


def test_kv_cached_greedy_generation_equals_full_recompute():
    model = tiny(n_kv_heads=2)
    prompt = torch.randint(0, 97, (2, 5))
    cached = generate(model, prompt, 20, temperature=0)
    recomputed = generate(model, prompt, 20, temperature=0, use_cache=False)
    assert cached.shape == (2, 25)
    assert torch.equal(cached, recomputed)


def test_sampling_is_deterministic_for_a_seed():
    model = tiny()
    a = generate(model, [1, 2, 3], 15, temperature=0.8, top_k=10, top_p=0.9, seed=7)
    b = generate(model, [1, 2, 3], 15, temperature=0.8, top_k=10, top_p=0.9, seed=7)
    c = generate(model, [1, 2, 3], 15, temperature=0.8, top_k=10, top_p=0.9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generation_stops_at_eos():
    model = tiny()
    first = generate(model, [5], 1, temperature=0)[0, -1].item()
    out = generate(model, [5], 10, temperature=0, eos_id=first)
    assert out.shape == (1, 2)


def test_top_k_and_top_p_keep_only_the_head_of_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]


def test_generation_past_max_seq_len_is_an_error():
    with pytest.raises(LmforgeError, match="max_new_tokens"):
        generate(tiny(), [1] * 30, 5)
