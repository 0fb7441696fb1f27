"""Text generation from a trained decoder: temperature / top-k / top-p sampling with a KV cache.

Deterministic for a given seed (a private torch.Generator); stops at EOS or after max_new_tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.data.tokens.tokenizer import encode_plain
from lmforge.core.errors import LmforgeError
from lmforge.model.decoder import KVCache, Transformer


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set of mass >= top_p."""
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """logits (B, V) -> next ids (B, 1); temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: torch.Tensor | list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Continue `prompt` ((T,) ids or (B, T)); returns (B, T + n) ids, n <= max_new_tokens.

    A row that emitted `eos_id` keeps emitting it, and generation stops once every row has.
    Without the cache the full sequence is recomputed each step (the reference the tests compare to).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    idx = torch.as_tensor(prompt, dtype=torch.long, device=device)
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    if idx.shape[1] == 0:
        raise LmforgeError("generate needs a prompt of at least one token (e.g. the EOS id)")
    max_len = model.config.max_seq_len
    if use_cache and idx.shape[1] + max_new_tokens > max_len:
        raise LmforgeError(
            f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len {max_len}: "
            "shorten the prompt or lower max_new_tokens"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    cache = None
    if use_cache:
        dtype = next(model.parameters()).dtype
        cache = KVCache(model.config, idx.shape[0], idx.shape[1] + max_new_tokens, device, dtype)
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=device)
    pos = 0
    step_input = idx
    for _ in range(max_new_tokens):
        if cache is not None:
            logits = model(step_input, cache=cache, start_pos=pos)
            pos += step_input.shape[1]
        else:
            logits = model(idx[:, -max_len:])
        next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
        if eos_id is not None:
            next_id = torch.where(finished.unsqueeze(1), torch.full_like(next_id, eos_id), next_id)
            finished |= next_id.squeeze(1) == eos_id
        idx = torch.cat([idx, next_id], dim=1)
        step_input = next_id
        if eos_id is not None and bool(finished.all()):
            break
    model.train(was_training)
    return idx


def sample_prompts(model: nn.Module, tokenizer: Any, gen: Any, eos_id: int | None) -> list[dict[str, str]]:
    """One completion per prompt of `gen` (a GenerateParams), decoded with `tokenizer`
    (a `tokenizers.Tokenizer`): the samples shown in the reports."""
    model.eval()
    samples = []
    for prompt in gen.prompts:
        ids = torch.tensor(encode_plain(tokenizer, [prompt]), dtype=torch.long)
        out = generate(model, ids, gen.max_new_tokens, temperature=gen.temperature, top_k=gen.top_k,
                       top_p=gen.top_p, eos_id=eos_id, seed=gen.seed)
        samples.append({"prompt": prompt, "text": tokenizer.decode(out[0, ids.shape[1]:].tolist())})
    return samples
