"""Process groups and the wrappers applied to a model from outside: FSDP2, activation checkpointing, compile.

The model module knows nothing of these; this module is the only place that touches torch.distributed setup.
"""

from __future__ import annotations

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

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK and join the process group (nccl on CUDA, gloo on CPU).

    Without torchrun (no RANK in the environment) no group is created: everything that would be a
    collective is skipped, so a single process needs no rendezvous. Under torchrun a group is created
    even for one process, so FSDP2 can be applied the same way at any world size.
    `device`: "cpu" or "cuda" to force one; default cuda when available.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise LmforgeError("device 'cuda' was asked for but torch sees no GPU: use device 'cpu'")
    if "RANK" not in os.environ:
        dev = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
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
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, is_main=rank == 0)


def destroy() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(group: Any = None) -> None:
    """A barrier (over `group`, default: all processes) when a process group exists, nothing otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def apply_fsdp(
    model: nn.Module,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard each block of `model.layers`, then the root (embeddings, norm, head), with FSDP2.

    `param_dtype` is the dtype of the gathered weights used for compute (bf16 on GPUs halves the
    all-gathers); the sharded master weights and the optimizer stay in float32.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise LmforgeError("apply_fsdp needs a process group: launch with torchrun and call init_distributed()")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward instead of storing them (full AC per block).

    Apply before `apply_compile` and `apply_fsdp`, as torchtitan does. State-dict names gain a
    `_checkpoint_wrapped_module` segment; lmforge.train.checkpoint and lmforge.model.export strip it.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.layers  # type: ignore[attr-defined]
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, preserve_rng_state=True)
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
