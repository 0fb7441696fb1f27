"""Behavior of exports: our safetensors format round-trips, and HF LlamaForCausalLM gives our logits."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.core.errors import LmforgeError
from lmforge.model.export import load_pretrained
from lmforge.train.export import export_hf_llama, save_pretrained
from lmforge.model.decoder import ModelConfig, Transformer


def model_for(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{"vocab_size": 101, "dim": 64, "n_layers": 2, "n_heads": 4,
                                      "max_seq_len": 32, **kw}))


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_round_trips_without_pickles(tmp_path, tie):
    model = model_for(tie_embeddings=tie, n_kv_heads=2)
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text("{}")
    out = save_pretrained(model, model.config, tmp_path / "model", tokenizer_path=tokenizer)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded, config = load_pretrained(out)
    assert config == model.config
    x = torch.randint(0, 101, (2, 9))
    assert torch.equal(loaded(x), model(x))
    # Written through a temp dir: nothing else is left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "tok.json"]


def test_saving_over_an_existing_export_replaces_it(tmp_path):
    save_pretrained(model_for(), model_for().config, tmp_path / "m")
    other = model_for(dim=32)
    save_pretrained(other, other.config, tmp_path / "m")
    assert load_pretrained(tmp_path / "m")[1].dim == 32


def test_loading_a_directory_without_weights_is_an_error(tmp_path):
    with pytest.raises(LmforgeError, match="model.safetensors"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("kw", [{"tie_embeddings": True}, {"tie_embeddings": False, "n_kv_heads": 2}])
def test_hf_llama_export_gives_the_same_logits(tmp_path, kw):
    transformers = pytest.importorskip("transformers")
    model = model_for(**kw).eval()
    out = export_hf_llama(model, model.config, tmp_path / "hf", eos_id=0)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x), atol=1e-4)
