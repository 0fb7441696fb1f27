"""The Llama-style decoder: config, presets, layers and the loss; plain torch, no parallelism.

Parallelism (FSDP2, activation checkpointing, compile) is applied from outside by `lmforge.train.distributed`.
Document masking (attention within a packed document only) and the chunked loss: lmforge.model.attention
and lmforge.model.loss.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.attention import DocumentMask, attend, document_mask
from lmforge.core.errors import LmforgeError
from lmforge.model.loss import IGNORE_INDEX, chunked_cross_entropy
from lmforge.core.presets import PRESETS as PRESET_SHAPES


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder. `n_kv_heads` < `n_heads` gives grouped-query attention."""

    vocab_size: int = 8192
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    # Llama's FFN rule: hidden = 2/3 * 4 * dim, times an optional multiplier, rounded up to multiple_of.
    ffn_dim_multiplier: float | None = None
    multiple_of: int = 32
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise LmforgeError(f"model dim {self.dim} is not divisible by n_heads {self.n_heads}: pick a dim that is")
        if self.head_dim % 2:
            raise LmforgeError(f"head_dim {self.head_dim} must be even for rotary positions: change dim or n_heads")
        if self.n_heads % self.kv_heads:
            raise LmforgeError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}: pick a divisor of n_heads"
            )
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
            if getattr(self, name) <= 0:
                raise LmforgeError(f"model {name} must be positive (got {getattr(self, name)})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise LmforgeError(f"model config has unknown keys {unknown}: allowed are {sorted(known)}")
        return cls(**raw)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count from the shape alone (tied embeddings counted once)."""
        d, h = self.dim, self.ffn_hidden
        kv = self.kv_heads * self.head_dim
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * h + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        total = self.n_layers * per_layer + d + embed
        return total - self.vocab_size * d if non_embedding else total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, as nanoGPT's estimate_mfu: 6N + 12*L*H*Q*T (attention)."""
        return 6.0 * self.num_params() + 12.0 * self.n_layers * self.n_heads * self.head_dim * seq_len

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if a tokenizer's ids would index past the embedding table."""
        if vocab_size > self.vocab_size:
            # The model's vocab_size is no param: pretrain takes it from the shards' manifest.json.
            raise LmforgeError(
                f"the tokenizer has {vocab_size} ids but the model embeds only {self.vocab_size} (its vocab_size): it was "
                "trained with another tokenizer; rerun `dvc repro pretrain` to train it on this one"
            )


PRESETS: dict[str, ModelConfig] = {name: ModelConfig(**shape) for name, shape in PRESET_SHAPES.items()}


def build_config(preset: str, **overrides: Any) -> ModelConfig:
    """A preset with some fields replaced (e.g. vocab_size and max_seq_len from the tokenizer)."""
    if preset not in PRESETS:
        raise LmforgeError(f"unknown model preset {preset!r}: choose one of {sorted(PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise LmforgeError(f"unknown model overrides {unknown}: allowed are {sorted(known)}")
    return replace(PRESETS[preset], **overrides)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """`x` scaled to unit root-mean-square over its last dimension, computed in float32 like HF Llama."""
    dtype = x.dtype
    x = x.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


class RMSNorm(nn.Module):
    """Computed in float32 like HF Llama, so exported logits match."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.eps)


def rotary_tables(config: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (max_seq_len, head_dim) in the rotate_half convention (HF Llama's)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    positions = torch.arange(config.max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D) already sliced to the positions of x, or (B, 1, T, D) when
    each row has its own positions (document masking)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to `max_len`."""

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        if max_len > config.max_seq_len:
            raise LmforgeError(
                f"a KV cache of {max_len} positions exceeds the model's max_seq_len {config.max_seq_len}: "
                "shorten the prompt or max_new_tokens"
            )
        shape = (batch_size, config.kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        cache: KVCache | None = None, start_pos: int = 0, mask: DocumentMask | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads, not n_heads: under tensor parallelism (applied from outside) each rank's
        # projections hold only its share of the heads (n_heads / N), as torchtitan's view does.
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_id, start_pos, k, v)
        if self.n_kv != self.n_heads:
            # Query head i reads kv head i // n_rep, as HF's repeat_kv does (the same ratio for a
            # tensor-parallel rank's local heads, whose kv heads are the matching slice).
            n_rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        if mask is not None:
            out = attend(q, k, v, mask)
        elif start_pos == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif t == 1:
            # One new token attends to every cached position: no mask needed.
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # A chunk after a prefix: causal within the chunk, full over the prefix.
            total = k.shape[2]
            mask = torch.ones(t, total, dtype=torch.bool, device=x.device).tril(diagonal=total - t)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm transformer block: the unit FSDP shards, checkpoints and compiles."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, layer_id)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = FeedForward(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        cache: KVCache | None = None, start_pos: int = 0, mask: DocumentMask | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start_pos, mask)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.embed.weight
        # Not persistent: derived from the config, so checkpoints and exports stay weights-only.
        cos, sin = rotary_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2/Llama init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def hidden_states(
        self, idx: torch.Tensor, *, cache: KVCache | None = None, start_pos: int = 0,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-norm hidden states (B, T, dim): what `output` turns into logits (and what a
        fine-tuning head reads). `segments` (B, T): the document index of each token of a packed
        row (lmforge.train.batches.document_segments); attention then stays inside a document and rotary
        positions restart at each one."""
        t = idx.shape[1]
        if start_pos + t > self.config.max_seq_len:
            raise LmforgeError(
                f"sequence of {start_pos + t} tokens is longer than the model's max_seq_len "
                f"{self.config.max_seq_len}: shorten it or raise model max_seq_len"
            )
        mask = None
        if segments is None:
            cos = self.rope_cos[start_pos : start_pos + t]
            sin = self.rope_sin[start_pos : start_pos + t]
        else:
            if cache is not None or start_pos:
                raise LmforgeError("document segments are for training on packed rows, not for cached decoding")
            mask = document_mask(segments)
            cos, sin = self.rope_cos[mask.positions].unsqueeze(1), self.rope_sin[mask.positions].unsqueeze(1)
        h = self.embed(idx)
        for layer in self.layers:
            h = layer(h, cos, sin, cache, start_pos, mask)
        return self.norm(h)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
        cache: KVCache | None = None, start_pos: int = 0, segments: torch.Tensor | None = None,
        loss_chunk: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]:
        """Logits (B, T, vocab); with targets also the mean cross-entropy (IGNORE_INDEX skipped).

        `loss_chunk` > 0 (with targets): the loss is the *summed* cross-entropy, computed `loss_chunk`
        tokens at a time so the (B, T, vocab) logits never exist; logits come back as None.
        """
        hidden = self.hidden_states(idx, cache=cache, start_pos=start_pos, segments=segments)
        if targets is not None and loss_chunk > 0:
            return None, chunked_cross_entropy(hidden, self.output.weight, targets, loss_chunk)
        logits = self.output(hidden)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )
        return logits, loss


# --- the fine-tuning architectures: a classification head on the decoder, or the decoder itself ---


def block_linear(module: nn.Module, fqn: str) -> bool:
    """A linear layer of a transformer block (the projections low precision applies to, never the head or
    the embeddings): `layers.N...` in a decoder, `backbone.layers.N...` in a classifier."""
    return isinstance(module, nn.Linear) and (fqn.startswith("layers.") or ".layers." in fqn)


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, D) hidden states of right-padded rows -> (B, D)."""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    if pooling == "mean":
        mask = (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
        return (hidden * mask.unsqueeze(-1)).sum(1) / lengths.clamp(min=1).unsqueeze(-1).to(hidden.dtype)
    raise LmforgeError(f"pooling {pooling!r} is not one of last, mean")


POOLINGS = ("last", "mean", "mean_embed")


class SequenceClassifier(nn.Module):
    """The pretrained decoder (`backbone`) + a linear `head` on its pooled final-norm hidden states
    (`mean_embed`: beside them, the mean of the input token embeddings, scaled to unit RMS like the
    final norm's output: the words themselves, which the blocks of a small model blur)."""

    def __init__(self, backbone: Transformer, n_labels: int, pooling: str = "last") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise LmforgeError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        self.backbone = backbone
        width = backbone.config.dim * (2 if pooling == "mean_embed" else 1)
        self.head = nn.Linear(width, n_labels)
        self.pooling = pooling
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def layers(self) -> nn.ModuleList:  # so lmforge.train.distributed.apply_fsdp shards the blocks
        return self.backbone.layers

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.hidden_states(input_ids)
        if self.pooling != "mean_embed":
            return self.head(pool(hidden, lengths, self.pooling).to(self.head.weight.dtype))
        words = rms_normalize(pool(self.backbone.embed(input_ids), lengths, "mean"), self.backbone.config.norm_eps)
        return self.head(torch.cat([pool(hidden, lengths, "mean"), words], -1).to(self.head.weight.dtype))


def build_model(backbone: Transformer, task: str, n_labels: int = 0, pooling: str = "last") -> nn.Module:
    """The trainable model before the method: a SequenceClassifier (classify) or the decoder itself (sft)."""
    if task == "classify":
        return SequenceClassifier(backbone, n_labels, pooling)
    return backbone
