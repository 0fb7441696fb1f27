"""Process groups, the device mesh (data-parallel shard x tensor-parallel) and the wrappers applied to
a model from outside: tensor parallelism, FSDP2, activation checkpointing, compile.

The model module knows nothing of these; this module is the only place that touches torch.distributed setup.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.core.errors import LmforgeError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. A plain `python` run is rank 0 of 1 with no process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    tensor_parallel: int = 1
    # The 2-D DeviceMesh ("dp_shard", "tp") under a process group; None for one plain process.
    mesh: Any = None

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: the processes of one tensor-parallel group read the same rows."""
        return self.world_size // self.tensor_parallel

    @property
    def dp_rank(self) -> int:
        """This process's data-parallel index (ranks r*tp .. r*tp+tp-1 form tensor-parallel group r)."""
        return self.rank // self.tensor_parallel

    @property
    def dp_group(self) -> Any:
        """The process group of the data-parallel dimension (None: all processes, when there is no TP)."""
        if self.mesh is None or self.tensor_parallel == 1:
            return None
        return self.mesh["dp_shard"].get_group()


def check_tensor_parallel(tensor_parallel: int, **counts: int) -> None:
    """Raise, before any work, when the degree does not divide a count: each TP rank takes n_heads/N
    query heads and n_kv_heads/N key/value heads, and the world_size processes form groups of N."""
    if tensor_parallel < 1:
        raise LmforgeError(f"pretrain.tensor_parallel must be >= 1 (got {tensor_parallel})")
    for what, count in counts.items():
        if count % tensor_parallel:
            raise LmforgeError(f"pretrain.tensor_parallel {tensor_parallel} does not divide {what} {count}: "
                               f"pick a tensor_parallel that divides it")


def init_distributed(device: str | None = None, timeout_s: float = 1800.0, tensor_parallel: int = 1) -> DistInfo:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK and join the process group (nccl on CUDA, gloo on CPU).

    Without torchrun (no RANK in the environment) no group is created: everything that would be a
    collective is skipped, so a single process needs no rendezvous. Under torchrun a group is created
    even for one process, so FSDP2 can be applied the same way at any world size.
    `device`: "cpu" or "cuda" to force one; default cuda when available. `tensor_parallel` N: the
    processes form a (world_size / N) x N device mesh, data-parallel shard x tensor-parallel.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise LmforgeError("device 'cuda' was asked for but torch sees no GPU: use device 'cpu'")
    if "RANK" not in os.environ:
        dev = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        check_tensor_parallel(tensor_parallel, world_size=1)
        return DistInfo(rank=0, world_size=1, local_rank=0, device=dev, is_main=True)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise LmforgeError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                "lower --nproc_per_node to the number of GPUs"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    check_tensor_parallel(tensor_parallel, world_size=world_size)  # before the rendezvous: every process stops
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (world_size // tensor_parallel, tensor_parallel), mesh_dim_names=("dp_shard", "tp"))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, is_main=rank == 0,
                    tensor_parallel=tensor_parallel, mesh=mesh)


def destroy() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(group: Any = None) -> None:
    """A barrier (over `group`, default: all processes) when a process group exists, nothing otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


# Megatron-style split of each block: q/k/v and the MLP's gate/up column-wise (each rank computes
# heads/N heads and hidden/N features, no communication), o and down row-wise (partial sums, one
# all-reduce each). Embeddings, norms and the output head stay replicated across the TP ranks (FSDP
# still shards them over dp): simpler than torchtitan's vocab-parallel embedding and loss parallel,
# keeps tied embeddings tied and the chunked loss working, at the cost of each TP rank computing the
# (small, at our sizes) head itself.
TP_PLAN = {
    "attn.q_proj": "colwise", "attn.k_proj": "colwise", "attn.v_proj": "colwise", "attn.o_proj": "rowwise",
    "ffn.gate_proj": "colwise", "ffn.up_proj": "colwise", "ffn.down_proj": "rowwise",
}


def apply_tp(model: nn.Module, tp_mesh: Any) -> nn.Module:
    """Split each block's projections over `tp_mesh` (TP_PLAN). The attention module then sees its
    local heads (heads/N per rank) through `view(b, t, -1, head_dim)`; nothing in the model changes."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    # Gathering a 2-D (FSDP x TP) weight whole (export, DCP) takes two all-gathers, and DTensor says
    # so on every rank, every run, as a performance hint: the user can act on nothing there.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    for block in model.layers:  # type: ignore[attr-defined]
        parallelize_module(block, tp_mesh, {name: styles[style]() for name, style in TP_PLAN.items()})
    return model


def apply_fsdp(
    model: nn.Module,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    mesh: Any = None,
) -> nn.Module:
    """Shard each block of `model.layers`, then the root (embeddings, norm, head), with FSDP2.

    `param_dtype` is the dtype of the gathered weights used for compute (bf16 on GPUs halves the
    all-gathers); `reduce_dtype` the dtype gradients are reduce-scattered in (bf16 halves those bytes);
    the sharded master weights, the gradients the optimizer reads and its state stay in float32.
    `mesh`: the data-parallel dimension of DistInfo.mesh (default: one flat mesh of every process).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise LmforgeError("apply_fsdp needs a process group: launch with torchrun and call init_distributed()")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        device_type = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    layers = model.layers  # type: ignore[attr-defined]
    for i, block in enumerate(layers):
        # The last block's weights are needed again at the start of backward: keep them gathered.
        reshard = reshard_after_forward and i < len(layers) - 1
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def parallelize(model: nn.Module, info: DistInfo, *, param_dtype: torch.dtype = torch.float32,
                reduce_dtype: torch.dtype = torch.float32, activation_checkpointing: str = "none",
                compile: bool = False) -> nn.Module:
    """Lay `model` out on `info.mesh` in torchtitan's order: tensor parallelism over "tp" (when > 1),
    activation checkpointing (`none` | `full` | `selective`), compile, then FSDP2 over "dp_shard"
    (under a process group)."""
    if info.tensor_parallel > 1:
        config = model.config  # type: ignore[attr-defined]
        check_tensor_parallel(info.tensor_parallel, world_size=info.world_size, n_heads=config.n_heads,
                              n_kv_heads=config.kv_heads)
        apply_tp(model, info.mesh["tp"])
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model)
    if info.distributed:
        mesh = info.mesh["dp_shard"] if info.mesh is not None else None
        apply_fsdp(model, param_dtype=param_dtype, reduce_dtype=reduce_dtype, mesh=mesh)
    return model


def clip_grad_norm_(parameters: Any, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ for gradients that live on different meshes (under FSDP x TP the
    blocks' are 2-D DTensors, the replicated embeddings' and norms' 1-D): each mesh's norm is
    computed and gathered apart, then combined. Returns the pre-clip total norm (a plain tensor)."""
    by_mesh: dict[Any, list[nn.Parameter]] = {}
    for p in parameters:
        if p.grad is not None:
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    if not by_mesh:
        return torch.zeros(())
    norms = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    # One mesh (no TP): that norm itself, bit for bit what torch's clip_grad_norm_ gives.
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), 2.0)
    if max_norm != float("inf"):
        from torch.distributed.tensor.experimental import implicit_replication

        with implicit_replication():  # the plain coefficient scales DTensor gradients
            for group in by_mesh.values():  # one mesh at a time: a foreach op cannot mix meshes
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)  # parameters: it scales their .grad
    return total


# Selective activation checkpointing keeps these ops' outputs and recomputes the rest (norms,
# activations, rotary, elementwise): torchtitan's op-level policy, here keeping every matmul's
# output (the expensive recomputation) and attention's.
SAVED_OPS = frozenset(
    op for op in (
        getattr(torch.ops.aten, "mm", None), getattr(torch.ops.aten, "bmm", None),
        getattr(torch.ops.aten, "addmm", None),
        getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None),
        getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None),
        getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None),
        getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None),
    ) if op is not None
)
AC_MODES = ("none", "full", "selective")


def _keep_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    saved = op in SAVED_OPS or getattr(op, "overloadpacket", None) in SAVED_OPS
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str = "full") -> nn.Module:
    """Recompute block activations in backward instead of storing them: `full` recomputes each
    whole block, `selective` keeps the outputs of its matmuls and attention and recomputes only the
    cheap ops between them (less memory saved, less compute spent); `none` leaves the model as is.

    Apply before `apply_compile` and `apply_fsdp`, as torchtitan does. State-dict names gain a
    `_checkpoint_wrapped_module` segment; lmforge.train.checkpoint and lmforge.model.export strip it.
    """
    if mode not in AC_MODES:
        raise LmforgeError(f"activation checkpointing {mode!r} is not one of {', '.join(AC_MODES)}")
    if mode == "none":
        return model
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    extra: dict[str, Any] = {}
    if mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        extra = {"context_fn": lambda: create_selective_checkpoint_contexts(_keep_matmuls)}
    layers = model.layers  # type: ignore[attr-defined]
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, preserve_rng_state=True, **extra)
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """torch.compile each block in place (same parameter names; blocks share one compiled graph)."""
    for block in model.layers:  # type: ignore[attr-defined]
        block.compile()
    return model


def clean_name(name: str) -> str:
    """A parameter name without the wrappers' segments (checkpoint wrapper, compile)."""
    for segment in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(segment, "")
    return name
