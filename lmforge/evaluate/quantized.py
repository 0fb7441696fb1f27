"""What int8 quantization costs and buys, measured by evaluate: the pretrained model quantized
(lmforge.model.quantize), written to models/pretrain_int8/, and scored beside full precision on
the same val rows (perplexity), the same test set (the fine-tuned classifier, quantized the same
way), its size on disk and its greedy generation speed on this CPU."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lmforge.core import paths
from lmforge.core.io import write_json
from lmforge.core.params import Params
from lmforge.data.tokens.shards import ShardReader
from lmforge.evaluate.metrics import language_model_loss, score_classifier
from lmforge.finetune.inference import FinetunedModel
from lmforge.model.decoder import ModelConfig, Transformer
from lmforge.model.files import WEIGHTS
from lmforge.model.quantize import (
    WEIGHTS_INT8, directory_bytes, generation_tokens_per_s, load_quantized, quantize, write_quantized,
)

SPEED_NEW_TOKENS = 32  # greedy tokens per generation-speed run
RESULT = paths.REPORTS / "quantization.json"

log = logging.getLogger("lmforge.evaluate")


def run(params: Params, pretrained: Transformer, lm: dict[str, Any], finetuned: FinetunedModel,
        classify: dict[str, Any] | None) -> dict[str, Any]:
    """The stage's one call: evaluate_int8 on evaluate's own val rows and test set, written to
    reports/quantization.json (speeds included: they vary by run, so not in metrics.json)."""
    from tokenizers import Tokenizer

    from lmforge.evaluate.evaluation import PRETRAINED as FULL, test_texts

    cfg = params.evaluate
    val = ShardReader(paths.SHARDS, "val", verify="size")
    tokenizer = Tokenizer.from_file(str(paths.PRETRAINED / "tokenizer.json"))
    prompt = tokenizer.encode(params.generate.prompts[0]).ids or [tokenizer.token_to_id(params.tokenizer.eos_token)]
    result = evaluate_int8(cfg.quantize, cfg.int8_max_perplexity_increase, pretrained, pretrained.config, val,
                           lm[FULL], params.runtime.evaluate.lm_micro_batch_size, cfg.lm_max_rows, prompt,
                           finetuned, test_texts(params) if classify else None,
                           classify["accuracy"] if classify else None)
    write_json(RESULT, result)
    if result["flagged"]:
        log.warning("the int8 model's perplexity is %+.2f%% of fp32's, above evaluate.int8_max_perplexity_increase "
                    "(%.2f%%): see report.md", 100 * result["perplexity_increase"], 100 * result["max_perplexity_increase"])
    return result


def perplexity_increase(full: float, quantized: float) -> float:
    """Relative change of perplexity, int8 against full precision (0.01: 1 % higher)."""
    return quantized / full - 1.0


def evaluate_int8(mode: str, max_increase: float, pretrained: Transformer, config: ModelConfig, val: Any,
                  full_lm: dict[str, Any], batch: int, max_rows: int | None, prompt_ids: list[int],
                  finetuned: FinetunedModel | None = None, test: tuple[list[str], list[str]] | None = None,
                  full_accuracy: float | None = None, out_dir: Path = paths.PRETRAINED_INT8) -> dict[str, Any]:
    """Quantize, write and score. `full_lm`: the full-precision model's figures on the same `val`
    rows; `test` (texts, labels) and `full_accuracy` when the fine-tuned model is a classifier."""
    written = write_quantized(quantize(pretrained, mode), config, out_dir, mode, paths.PRETRAINED / "tokenizer.json")
    quantized = load_quantized(written)  # scored as a user would load it: what the directory holds
    lm = language_model_loss(quantized, val, batch, max_rows)
    increase = perplexity_increase(full_lm["perplexity"], lm["perplexity"])
    out: dict[str, Any] = {
        "mode": mode,
        "rows": [
            {"model": "pretrained (fp32)", "bytes": directory_bytes(paths.PRETRAINED, WEIGHTS),
             "val_loss": full_lm["loss"], "perplexity": full_lm["perplexity"],
             "tokens_per_s": generation_tokens_per_s(pretrained, prompt_ids, SPEED_NEW_TOKENS)},
            {"model": f"pretrained ({mode})", "bytes": directory_bytes(out_dir, WEIGHTS_INT8),
             "val_loss": lm["loss"], "perplexity": lm["perplexity"],
             "tokens_per_s": generation_tokens_per_s(quantized, prompt_ids, SPEED_NEW_TOKENS)},
        ],
        "perplexity_increase": increase,
        "max_perplexity_increase": max_increase,
        "flagged": increase > max_increase,
    }
    if finetuned is not None and test is not None and finetuned.task == "classify":
        small = FinetunedModel(quantize(finetuned.model, mode), finetuned.config, finetuned.meta, finetuned.tokenizer)
        accuracy = score_classifier(small, *test)["accuracy"]
        out["rows"][0]["accuracy"], out["rows"][1]["accuracy"] = full_accuracy, accuracy
        out["accuracy_change"] = accuracy - full_accuracy if full_accuracy is not None else None
    return out


def metrics(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The deterministic figures, for reports/metrics.json (`dvc metrics`): no speeds, which vary by run."""
    full, small = result["rows"]
    out = {"perplexity": small["perplexity"], "perplexity_increase": result["perplexity_increase"],
           "size_ratio": small["bytes"] / full["bytes"]}
    if small.get("accuracy") is not None:
        out["accuracy"] = small["accuracy"]
    return {"int8": out}


def speeds(result: dict[str, Any]) -> dict[str, float]:
    """Generation tokens/s of both models, for MLflow (a figure of this run's machine)."""
    full, small = result["rows"]
    return {"generation_tokens_per_s.fp32": full["tokens_per_s"], "generation_tokens_per_s.int8": small["tokens_per_s"]}
