"""Post-training int8 quantization (lmforge.model.quantize): what it changes, what it keeps, and
its directory read back exactly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lmforge.core.errors import LmforgeError
from lmforge.model.decoder import ModelConfig, Transformer
from lmforge.model.quantize import (
    MODES, WEIGHTS_INT8, directory_bytes, generation_tokens_per_s, load_quantized, quantize, write_quantized,
)

from conftest import tool_env

CONFIG = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, max_seq_len=32)


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CONFIG).eval()


@pytest.mark.parametrize("mode", MODES)
def test_the_blocks_linears_are_int8_the_rest_fp32_and_the_logits_stay_close(mode):
    model = _model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    quantized = quantize(model, mode)
    kinds = {name: type(p.data if isinstance(p, torch.nn.Parameter) else p).__name__
             for name, p in quantized.state_dict().items()}
    linear = [n for n in kinds if n.startswith("layers.") and n.endswith("proj.weight")]
    assert linear and all(kinds[n] != "Tensor" for n in linear), kinds
    assert kinds["embed.weight"] == "Tensor" and kinds["norm.weight"] == "Tensor"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the original untouched
    ids = torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, small = model(ids), quantized(ids)
    assert not torch.equal(full, small)  # it did quantize
    assert torch.allclose(full, small, atol=0.05 * full.abs().max().item()), (full - small).abs().max()


def test_a_written_model_loads_back_with_the_same_logits_and_is_smaller(tmp_path):
    model = _model()
    quantized = quantize(model, "int8_weight_only")
    out = write_quantized(quantized, CONFIG, tmp_path / "int8", "int8_weight_only")
    loaded = load_quantized(out)
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(ids), quantized(ids))
    torch.save(model.state_dict(), tmp_path / "fp32.pt")
    assert directory_bytes(out, WEIGHTS_INT8) < 0.6 * (tmp_path / "fp32.pt").stat().st_size
    again = write_quantized(quantized, CONFIG, tmp_path / "again", "int8_weight_only")
    assert (again / WEIGHTS_INT8).read_bytes() == (out / WEIGHTS_INT8).read_bytes()  # DVC hashes bytes


def test_bad_mode_and_missing_files_are_one_clear_line(tmp_path):
    with pytest.raises(LmforgeError, match="unknown quantization mode 'int4'.*int8_weight_only"):
        quantize(_model(), "int4")
    with pytest.raises(LmforgeError, match="model_int8.pt is missing"):
        load_quantized(tmp_path)


def test_generation_speed_is_positive_tokens_per_second():
    assert generation_tokens_per_s(quantize(_model(), "int8_weight_only"), [1, 2, 3], 8, repeats=1) > 0


def test_importing_torchao_prints_nothing_on_the_terminal():
    code = ("from lmforge.model.decoder import ModelConfig, Transformer\n"
            "from lmforge.model.quantize import quantize\n"
            "quantize(Transformer(ModelConfig(vocab_size=32, dim=32, n_layers=1, n_heads=2)), 'int8_dynamic')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=tool_env(), timeout=120)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr
