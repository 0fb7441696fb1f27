"""Post-training int8 quantization of a decoder (torchao) and its directory on disk.

The linear layers of the blocks are quantized (attention and MLP projections: nearly all the
compute and, for a model wider than its vocabulary, the weights); the embeddings, norms and output
head stay in float32, as torchao's and torchtitan's recipes leave them. Two modes:
`int8_weight_only` (int8 weights dequantized in the matmul: 4x smaller linears, fp32 arithmetic)
and `int8_dynamic` (int8 weights and per-token int8 activations: integer matmuls where the CPU has them).

On disk: model_int8.pt (the state dict, torch.save's zip; torchao's tensor subclasses load with
`torch.load(weights_only=True)`, no pickled code), config.json, tokenizer.json, quantization.json.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.core.errors import LmforgeError
from lmforge.core.quiet import torchao_module
from lmforge.model.decoder import ModelConfig, Transformer, block_linear
from lmforge.model.export import write_atomically
from lmforge.model.files import CONFIG, TOKENIZER

MODES = ("int8_weight_only", "int8_dynamic")
WEIGHTS_INT8 = "model_int8.pt"
QUANTIZATION = "quantization.json"


def _config(mode: str) -> Any:
    if mode not in MODES:
        raise LmforgeError(f"unknown quantization mode {mode!r}: one of {', '.join(MODES)}")
    quantization = torchao_module("torchao.quantization", "int8 quantization")
    return (quantization.Int8WeightOnlyConfig() if mode == "int8_weight_only"
            else quantization.Int8DynamicActivationInt8WeightConfig())


def quantize(model: nn.Module, mode: str) -> nn.Module:
    """A quantized copy of `model` (eval mode, on the CPU); `model` itself is left as it was."""
    config = _config(mode)  # imports torchao quietly first
    from torchao.quantization import quantize_

    quantized = copy.deepcopy(model).cpu().eval()
    quantize_(quantized, config, filter_fn=block_linear)
    return quantized


def write_quantized(model: Transformer, config: ModelConfig, out_dir: str | Path, mode: str,
                    tokenizer_path: str | Path | None = None) -> Path:
    """`model` (already quantized by `quantize`) as a directory load_quantized reads back."""

    def fill(tmp: Path) -> None:
        torch.save(model.state_dict(), tmp / WEIGHTS_INT8)
        (tmp / CONFIG).write_text(json.dumps(config.to_dict(), indent=2))
        (tmp / QUANTIZATION).write_text(json.dumps({"mode": mode, "quantized": "linear layers of the blocks"}, indent=2))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER)

    return write_atomically(Path(out_dir), fill)


def load_quantized(model_dir: str | Path) -> Transformer:
    """The model write_quantized wrote: the architecture quantized the same way, then its tensors."""
    model_dir = Path(model_dir)
    for name in (WEIGHTS_INT8, CONFIG, QUANTIZATION):
        if not (model_dir / name).is_file():
            raise LmforgeError(f"{model_dir / name} is missing: rerun the stage that quantizes (`dvc repro evaluate`)")
    config = ModelConfig.from_dict(json.loads((model_dir / CONFIG).read_text()))
    mode = json.loads((model_dir / QUANTIZATION).read_text())["mode"]
    model = quantize(Transformer(config), mode)
    try:
        state = torch.load(model_dir / WEIGHTS_INT8, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same advice
        raise LmforgeError(f"{model_dir / WEIGHTS_INT8} cannot be read ({exc}): rerun `dvc repro -f evaluate`") from None
    model.load_state_dict(state, assign=True)
    return model.eval()


def directory_bytes(model_dir: str | Path, pattern: str) -> int:
    """Bytes of the weights files matching `pattern` in `model_dir` (what a download of the model costs)."""
    return sum(path.stat().st_size for path in Path(model_dir).glob(pattern))


@torch.no_grad()
def generation_tokens_per_s(model: Transformer, prompt: list[int], new_tokens: int, repeats: int = 3) -> float:
    """Greedy decoding speed with the KV cache on this CPU: the best of `repeats` runs (the least
    disturbed by other work on the machine), after one warm-up."""
    from lmforge.model.generate import generate

    new_tokens = min(new_tokens, model.config.max_seq_len - len(prompt))
    generate(model, prompt, 1, temperature=0.0)  # warm-up: first-call allocations
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        generate(model, prompt, new_tokens, temperature=0.0)
        best = min(best, time.perf_counter() - started)
    return new_tokens / best
