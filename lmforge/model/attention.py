"""Document-masked attention for packed rows: a token attends only to earlier tokens of its own
document, and its rotary position counts from the document's first token.

Two kernels, picked by device (measured, see README "Document masking"): on CUDA, compiled
`flex_attention` with a block mask (it skips the blocks no document spans); elsewhere SDPA with an
explicit boolean mask, because torch 2.13's flex_attention has no backward on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DocumentMask:
    """Built once per forward from the segments and shared by every layer."""

    positions: torch.Tensor  # (B, T) int64: index of each token within its document
    dense: torch.Tensor | None = None  # (B, 1, T, T) bool, True where attention is allowed (SDPA)
    block: Any = None  # a flex_attention BlockMask (CUDA)


def document_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) document index per token -> (B, T) position of each token inside its document."""
    t = segments.shape[1]
    index = torch.arange(t, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    # The start index of each token's document: the running max of the start indices so far.
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def use_flex(device: torch.device) -> bool:
    return device.type == "cuda"


# flex_attention compiled once, on first use (set outside the compiled blocks, read inside them).
_flex: Any = None


def document_mask(segments: torch.Tensor) -> DocumentMask:
    positions = document_positions(segments)
    t = segments.shape[1]
    if use_flex(segments.device):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        global _flex
        if _flex is None:
            _flex = torch.compile(flex_attention, dynamic=False)

        def same_document_causal(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return (segments[b, q] == segments[b, kv]) & (q >= kv)

        block = create_block_mask(same_document_causal, segments.shape[0], None, t, t,
                                  device=segments.device, _compile=True)
        return DocumentMask(positions, block=block)
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    dense = (segments[:, :, None] == segments[:, None, :]) & causal
    return DocumentMask(positions, dense=dense.unsqueeze(1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask) -> torch.Tensor:
    """(B, H, T, D) queries/keys/values -> (B, H, T, D), each token seeing only its own document."""
    if mask.block is not None:
        return _flex(q, k, v, block_mask=mask.block)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)
