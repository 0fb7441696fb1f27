"""FP8 training (`pretrain.precision: fp8`, lmforge.train.fp8) on what a CPU can run: which layers
convert, the refusal without a capable GPU, the params that refuse it elsewhere, and the trainer's
fp8 path with torchao's emulated float8 matmuls (the casts and scales are real; the GPU runs the
same code with float8 kernels: tests/gpu/test_fp8_training.py)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from conftest import helper_losses, tool_env  # noqa: E402
from train_helper import SyntheticRows, tiny_config  # noqa: E402

from lmforge.core.errors import LmforgeError  # noqa: E402
from lmforge.core.params import TrainerParams, load_params  # noqa: E402
from lmforge.model.decoder import ModelConfig, Transformer  # noqa: E402
from lmforge.train import fp8  # noqa: E402
from lmforge.train.batches import PackedRows  # noqa: E402
from lmforge.train.communication import Layout, step_bytes  # noqa: E402
from lmforge.train.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROJECTIONS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "ffn.gate_proj", "ffn.up_proj",
               "ffn.down_proj")
# Emulated fp8 against bf16 from the same init over 6 steps: measured 4e-4 relative at most.
CPU_CURVE_RTOL = 2e-3


@pytest.fixture
def one_thread():
    """bf16 autocast around torchao's emulated matmuls is ~50x slower on two busy threads than on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_refusal_names_the_key_the_gpu_requirement_and_the_fix():
    no_gpu = fp8.refusal("pretrain.precision", None)
    old_gpu = fp8.refusal("pretrain.precision", (8, 0))  # an A100
    for reason in (no_gpu, old_gpu):
        assert reason is not None and "\n" not in reason
        assert reason.startswith("pretrain.precision: fp8 needs a CUDA GPU of compute capability >= 8.9")
        assert reason.endswith("use pretrain.precision: bf16")
    assert "torch sees no GPU" in no_gpu and "this GPU has 8.0" in old_gpu
    assert fp8.refusal("pretrain.precision", (8, 9)) is None and fp8.refusal("pretrain.precision", (9, 0)) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the refusal is for machines without one")
def test_pretrain_stage_refuses_fp8_before_any_work_without_a_capable_gpu(tmp_path):
    """One line and exit status 2, before reading shards (there are none here) or importing torchao."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pretrain": {"precision": "fp8"}}))
    done = subprocess.run([sys.executable, "-m", "stages.pretrain"], cwd=tmp_path, capture_output=True, text=True,
                          env=tool_env(PYTHONPATH=str(REPO)), timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("[pretrain] error: pretrain.precision: fp8 needs a CUDA GPU of compute capability "
                                   ">= 8.9 (H100, L4, RTX 4090 or newer), and torch sees no GPU here: "
                                   "use pretrain.precision: bf16")


def _load(tmp_path: Path, values: dict) -> object:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(values))
    return load_params(tmp_path / "params.yaml")


def test_params_accept_fp8_for_pretrain_and_refuse_it_for_finetune_and_with_tensor_parallel(tmp_path):
    params = _load(tmp_path, {"pretrain": {"precision": "fp8", "fp8_recipe": "rowwise"}})
    assert (params.pretrain.precision, params.pretrain.fp8_recipe) == ("fp8", "rowwise")
    assert params.trainer("pretrain").precision == "fp8"
    with pytest.raises(LmforgeError, match=r"finetune\.precision: fp8 trains the pretrain stage only.*use bf16"):
        _load(tmp_path, {"finetune": {"precision": "fp8"}})
    with pytest.raises(LmforgeError, match=r"pretrain\.precision fp8 with pretrain\.tensor_parallel 2 is not supported"):
        _load(tmp_path, {"pretrain": {"precision": "fp8", "tensor_parallel": 2}, "runtime": {"pretrain": {"nproc": 2}}})
    with pytest.raises(LmforgeError, match=r"pretrain\.fp8_recipe.*'tensorwise' or 'rowwise'"):
        _load(tmp_path, {"pretrain": {"fp8_recipe": "blockwise"}})


def test_params_yaml_and_the_reference_document_fp8_and_its_recipe():
    text = (REPO / "params.yaml").read_text()
    reference = (REPO / "docs/reference/params.md").read_text()
    assert "fp8_recipe: tensorwise" in text and "| `fp8` (pretrain" in text
    assert "pretrain.fp8_recipe" in reference and "compute capability >= 8.9" in reference


def test_the_blocks_projections_are_selected_never_the_head_or_the_embeddings():
    model = Transformer(tiny_config())
    selection = fp8.select(model)
    assert selection.converted == tuple(f"layers.{i}.{name}" for i in range(2) for name in PROJECTIONS)
    assert selection.skipped == ()


def test_projections_with_a_dim_not_a_multiple_of_16_are_skipped_and_named():
    # One kv head of 12 dims: k_proj and v_proj are 48 -> 12, which float8 kernels cannot take.
    model = Transformer(ModelConfig(vocab_size=64, dim=48, n_layers=1, n_heads=4, n_kv_heads=1, max_seq_len=16))
    selection = fp8.select(model)
    assert selection.skipped == ("layers.0.attn.k_proj", "layers.0.attn.v_proj")
    assert len(selection.converted) == 5 and not set(selection.converted) & set(selection.skipped)
    assert fp8.describe(selection) == ("fp8: 5 linear layers in float8; 2 left in bf16 (a dimension not a multiple "
                                       "of 16): layers.0.attn.k_proj, layers.0.attn.v_proj")


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_convert_swaps_exactly_the_selected_layers_and_keeps_parameter_names(recipe):
    from torchao.float8.float8_linear import Float8Linear

    model = Transformer(ModelConfig(vocab_size=64, dim=48, n_layers=1, n_heads=4, n_kv_heads=1, max_seq_len=16))
    names = list(model.state_dict())
    selection = fp8.convert(model, recipe, fsdp=False, emulate=True)
    swapped = tuple(fqn for fqn, module in model.named_modules() if isinstance(module, Float8Linear))
    assert swapped == selection.converted
    assert type(model.output) is nn.Linear and model.output.weight is model.embed.weight  # tied, untouched
    assert type(model.layers[0].attn.k_proj) is nn.Linear
    assert list(model.state_dict()) == names  # checkpoints and exports read the same keys


def test_tensorwise_gathers_in_float8_under_fsdp_only():
    assert fp8.float8_config("tensorwise", fsdp=True).enable_fsdp_float8_all_gather
    assert not fp8.float8_config("tensorwise", fsdp=False).enable_fsdp_float8_all_gather
    assert not fp8.float8_config("rowwise", fsdp=True).enable_fsdp_float8_all_gather  # torchao: tensorwise only
    with pytest.raises(LmforgeError, match="pretrain.fp8_recipe 'blockwise' is not one of tensorwise, rowwise"):
        fp8.float8_config("blockwise", fsdp=False)


def test_float8_all_gather_sends_the_projections_in_one_byte():
    config = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=32)
    bf16 = step_bytes(config, Layout(dp=2, param_bytes=2, reduce_bytes=4))
    float8 = step_bytes(config, Layout(dp=2, param_bytes=2, projection_bytes=1, reduce_bytes=4))
    projections = 2 * 64 * 64 * 2 + 3 * 64 * config.ffn_hidden  # q, o + k, v (4 kv heads) + the MLP
    gathers = 2 + 1  # both blocks in forward, the first again in backward
    assert bf16.all_gather - float8.all_gather == round(0.5 * gathers * projections)
    assert float8.reduce_scatter == bf16.reduce_scatter


def _curve(precision: str, recipe: str | None, model: Transformer) -> list[float]:
    if recipe is not None:
        fp8.convert(model, recipe, fsdp=False, emulate=True)
    cfg = TrainerParams(max_steps=6, micro_batch_size=4, warmup_steps=0, eval_every=0, eval_batches=2,
                        checkpoint_every=0, progress=False, lr=3e-3, precision=precision)
    losses: list[float] = []
    Trainer(model, cfg, PackedRows(SyntheticRows(128, 1), SyntheticRows(32, 2)),
            on_metrics=lambda step, metrics: losses.append(metrics["train_loss"])).fit()
    return losses


def test_fp8_training_follows_the_bf16_loss_curve_with_emulated_float8(one_thread):
    """The trainer's fp8 path (bf16 autocast around the float8 layers, the scale precompute after
    each step) learns, and stays on bf16's curve from the same init."""
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    bf16 = _curve("bf16", None, copy.deepcopy(model))
    float8 = _curve("fp8", "tensorwise", model)
    assert float8[-1] < float8[0]
    assert float8 == pytest.approx(bf16, rel=CPU_CURVE_RTOL)


def test_fp8_under_fsdp_gathers_float8_weights_and_follows_one_process(helper_runs):
    """Two FSDP2 ranks (gloo) with tensorwise float8 all-gather and the scale precompute after each
    step give one process's fp8 curve (same global batch), checkpoint (DCP) and export
    (conftest.helper_runs: `one_fp8` and `fsdp_fp8`)."""
    one, two = helper_losses(helper_runs["one_fp8"]), helper_losses(helper_runs["fsdp_fp8"])
    assert sorted(two) == list(range(1, 7))
    # Not bitwise: the ranks reduce gradients in another order than one process sums them.
    assert [two[step] for step in sorted(two)] == pytest.approx([one[step] for step in sorted(two)], rel=1e-4)
    assert sorted(p.name for p in (helper_runs["fsdp_fp8"] / "checkpoints").glob("step_*")) == [
        "step_00000003", "step_00000006"]
    assert (helper_runs["fsdp_fp8"] / "model/model.safetensors").is_file()


def test_the_pretrain_stage_builds_its_decoder_with_float8_layers_when_precision_is_fp8(tmp_path):
    """lmforge.train.pretraining.build_decoder, the stage's model, converts before any wrapper."""
    from types import SimpleNamespace

    from torchao.float8.float8_linear import Float8Linear

    from lmforge.train.distributed import init_distributed
    from lmforge.train.pretraining import build_decoder

    params = _load(tmp_path, {"model": {"preset": "tiny", "dim": 32}, "pretrain": {"precision": "fp8"}})
    model, config = build_decoder(params, SimpleNamespace(vocab_size=320, seq_len=32), init_distributed(device="cpu"))
    swapped = [fqn for fqn, module in model.named_modules() if isinstance(module, Float8Linear)]
    assert swapped == [f"layers.{i}.{name}" for i in range(config.n_layers) for name in PROJECTIONS]
    plain = build_decoder(_load(tmp_path, {"model": {"preset": "tiny", "dim": 32}}),
                          SimpleNamespace(vocab_size=320, seq_len=32), init_distributed(device="cpu"))[0]
    assert not any(isinstance(module, Float8Linear) for module in plain.modules())
