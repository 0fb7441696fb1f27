"""How fast a training step ran against the hardware: peak FLOP/s per device, MFU, peak memory.

The trainer reports these per step; nothing here touches the model or the data.
"""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 tensor-core peak FLOP/s per device, matched by substring of torch.cuda.get_device_name().
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s, device name); None when the device is not in PEAK_FLOPS (CPUs never are)."""
    if device.type != "cuda":
        return None, "CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value, name
    return None, name


def mfu(flops_per_token: float | None, tokens_per_s: float, device: torch.device, world_size: int) -> float | None:
    """Model FLOPs utilization (nanoGPT's estimate_mfu): achieved over peak FLOP/s, all devices;
    None when the peak or the model's FLOPs per token is unknown."""
    peak, _ = peak_flops(device)
    if peak is None or flops_per_token is None:
        return None
    return flops_per_token * tokens_per_s / (peak * world_size)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, else the resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
