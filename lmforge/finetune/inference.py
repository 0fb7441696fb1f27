"""A fine-tuned model loaded for inference from the files the finetune stage exports (no pickles).

The stable API (the evaluate and promote stages use it; the files are written and read by lmforge.model.export):
    model = load_finetuned("models/finetune", device="cpu")    # -> FinetunedModel
    model.task, model.labels, model.config, model.meta
    classify: model.predict(texts) -> list[str]; model.predict_proba(texts) -> Tensor (N, n_labels);
              model.predict_logits(texts) -> Tensor (N, n_labels)      (batched, padded)
    sft:      model.generate(prompts, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None,
                             seed=0) -> list[str]   (the completions, EOS and after removed)
              model.lm_loss(prompts, responses) -> (summed CE over response+EOS tokens, n_tokens)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.core.errors import LmforgeError
from lmforge.data.tokens.tokenizer import encode_plain
from lmforge.model.decoder import ModelConfig
from lmforge.model.export import read_finetuned
from lmforge.model.loss import lm_loss
from lmforge.finetune.examples import (
    EOS_TOKEN, PAD_TOKEN, classify_collate, encode_sft, encode_texts, sft_collate, special_ids,
)


class FinetunedModel:
    """A fine-tuned model loaded for inference (see the module docstring for the API)."""

    def __init__(self, model: nn.Module, config: ModelConfig, meta: dict[str, Any], tokenizer: Any,
                 device: str | torch.device = "cpu") -> None:
        self.model = model.eval()
        self.config, self.meta, self.tokenizer = config, meta, tokenizer
        self.task: str = meta["task"]
        self.labels: list[str] = list(meta.get("labels") or [])
        self.max_length: int = int(meta["max_length"])
        self.prompt_separator: str = meta.get("prompt_separator", "\n")
        self.device = torch.device(device)
        self.eos_id, self.pad_id = special_ids(tokenizer, meta.get("eos_token", EOS_TOKEN), meta.get("pad_token", PAD_TOKEN))

    def _need(self, task: str, what: str) -> None:
        if self.task != task:
            raise LmforgeError(f"{what} is for task {task!r}; this model was fine-tuned for {self.task!r}")

    @torch.no_grad()
    def predict_logits(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(N, n_labels) float32 logits, in `labels` order."""
        self._need("classify", "predict")
        ids = encode_texts(self.tokenizer, list(texts), min(self.max_length, self.config.max_seq_len), self.eos_id)
        collate = classify_collate(self.pad_id)
        out = []
        for start in range(0, len(ids), batch_size):
            batch = collate([(row, 0) for row in ids[start : start + batch_size]])
            logits = self.model(input_ids=batch["input_ids"].to(self.device), lengths=batch["lengths"].to(self.device))
            out.append(logits.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        return self.predict_logits(texts, batch_size).softmax(-1)

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[str]:
        return [self.labels[i] for i in self.predict_logits(texts, batch_size).argmax(-1).tolist()]

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
        top_k: int | None = None, top_p: float | None = None, seed: int | None = 0,
    ) -> list[str]:
        """The completion of each `prompt + prompt_separator`, up to EOS (not included)."""
        from lmforge.model.generate import generate

        self._need("sft", "generate")
        outs = []
        budget = self.config.max_seq_len - max_new_tokens
        if budget < 1:
            raise LmforgeError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in max_seq_len {self.config.max_seq_len}")
        for prompt in prompts:
            ids = encode_plain(self.tokenizer, [prompt + self.prompt_separator])[0][-budget:] or [self.eos_id]
            out = generate(self.model, torch.tensor([ids]), max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, eos_id=self.eos_id, seed=seed)[0, len(ids):].tolist()
            if self.eos_id in out:
                out = out[: out.index(self.eos_id)]
            outs.append(self.tokenizer.decode(out))
        return outs

    @torch.no_grad()
    def lm_loss(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32) -> tuple[float, int]:
        """(summed cross-entropy over the response + EOS tokens, number of those tokens), as in training."""
        self._need("sft", "lm_loss")
        if len(prompts) != len(responses):
            raise LmforgeError(f"{len(prompts)} prompts but {len(responses)} responses: pass one response per prompt")
        rows = encode_sft(self.tokenizer, prompts, responses, min(self.max_length, self.config.max_seq_len + 1),
                          self.prompt_separator, self.eos_id)
        collate = sft_collate(self.pad_id)
        total, count = 0.0, 0
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(self.device) for k, v in collate(rows[start : start + batch_size]).items()}
            loss_sum, n = lm_loss(self.model, batch)
            total, count = total + float(loss_sum), count + int(n)
        return total, count


def load_finetuned(model_dir: str | Path, device: str | torch.device = "cpu") -> FinetunedModel:
    """The model the finetune stage exported (lmforge.train.export.save_finetuned), ready for inference."""
    from lmforge.data.tokens.tokenizer import load_tokenizer

    model, config, meta = read_finetuned(model_dir, device)
    return FinetunedModel(model, config, meta, load_tokenizer(Path(model_dir) / "tokenizer.json"), device)
