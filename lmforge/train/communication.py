"""The bytes one optimizer step sends per process, from the model's shapes and the layout alone (no
measurement): FSDP2's all-gathers of parameters and reduce-scatters of gradients over the
data-parallel ranks, and tensor parallelism's all-reduces of activations.

Each collective is counted as a ring algorithm sends it: all-gather and reduce-scatter of S bytes
send (n - 1) / n * S per process, an all-reduce twice that. Padding of shards is ignored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lmforge.model.decoder import ModelConfig

# fp8: what FSDP2 gathers of the weights that are not float8 (bf16); Layout.projection_bytes the rest.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}


@dataclass(frozen=True)
class Layout:
    """How a step runs: the mesh, the rows and the dtypes that go over the wire."""

    dp: int  # data-parallel (FSDP) ranks
    tp: int = 1  # tensor-parallel ranks
    micro_batch_size: int = 1
    seq_len: int = 1
    grad_accum_steps: int = 1
    param_bytes: int = 4  # the all-gathered weights (FSDP's param_dtype)
    # The blocks' projections when they are gathered in another dtype (fp8 tensorwise: float8, 1
    # byte); None: param_bytes.
    projection_bytes: int | None = None
    reduce_bytes: int = 4  # the reduce-scattered gradients (FSDP's reduce_dtype: pretrain.reduce_precision)
    activation_bytes: int = 4  # the activations TP all-reduces (the autocast dtype)
    reshard_after_forward: bool = True


@dataclass(frozen=True)
class StepBytes:
    all_gather: int  # parameters, every micro-step's forward (and backward, for resharded blocks)
    reduce_scatter: int  # gradients, once per optimizer step (the last micro-step syncs)
    tp_all_reduce: int  # activations: 2 all-reduces per block in forward, 5 in backward

    @property
    def total(self) -> int:
        return self.all_gather + self.reduce_scatter + self.tp_all_reduce

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def unit_elements(config: ModelConfig, tp: int) -> tuple[list[int], int]:
    """Elements each process holds, before FSDP, of each block and of the root (embeddings, final
    norm, head): a block's projections are split tp ways (lmforge.train.distributed.TP_PLAN), its
    norms and the root are replicated."""
    d = config.dim
    block = projection_elements(config, tp) + 2 * d
    root = config.vocab_size * d * (1 if config.tie_embeddings else 2) + d
    return [block] * config.n_layers, root


def projection_elements(config: ModelConfig, tp: int) -> int:
    """Elements of one block's projections (q, k, v, o, gate, up, down) each process holds before FSDP."""
    d, kv = config.dim, config.kv_heads * config.head_dim
    return (2 * d * d + 2 * d * kv + 3 * d * config.ffn_hidden) // tp


def step_bytes(config: ModelConfig, layout: Layout) -> StepBytes:
    """Bytes one process sends in one optimizer step (layout.grad_accum_steps micro-steps).

    FSDP2 gathers every unit in each micro-step's forward; a block resharded after forward (all
    but the last, see apply_fsdp) is gathered again in backward; the root never is (FSDP2 keeps the
    root gathered). Gradients are reduce-scattered once, on the last micro-step."""
    blocks, root = unit_elements(config, layout.tp)
    share = (layout.dp - 1) / layout.dp
    projections = projection_elements(config, layout.tp)
    projection_bytes = layout.param_bytes if layout.projection_bytes is None else layout.projection_bytes
    block_bytes = [(block - projections) * layout.param_bytes + projections * projection_bytes for block in blocks]
    regathered = sum(block_bytes[:-1]) if layout.reshard_after_forward else 0
    gathered_bytes = layout.grad_accum_steps * (sum(block_bytes) + root * layout.param_bytes + regathered)
    activations = layout.micro_batch_size * layout.seq_len * config.dim
    tp_share = 2 * (layout.tp - 1) / layout.tp
    return StepBytes(
        all_gather=round(share * gathered_bytes),
        reduce_scatter=round(share * (sum(blocks) + root) * layout.reduce_bytes),
        tp_all_reduce=round(tp_share * layout.grad_accum_steps * config.n_layers * 7 * activations
                            * layout.activation_bytes),
    )
