"""Which devices the app serves from: one generation runs on each at a time (the pool itself is
``loopui.models.DevicePool``)."""

from __future__ import annotations

from typing import Any, Optional


def cuda_available() -> bool:
    """Whether a CUDA device is usable (asks torch; creates no CUDA context of ours)."""
    import torch

    return bool(torch.cuda.is_available())


def device_pool(devices: Optional[Any], has_gpu: bool, zero_gpu: bool = False) -> Any:
    """A ``loopui.models.DevicePool`` over ``devices`` ("cuda:0,cuda:1" or a list; None = every visible GPU, else
    the CPU), or on a ZeroGPU Space over the one "cuda" device it attaches per call. ``ValueError`` names a device
    that does not exist."""
    from loopui.models import DevicePool, parse_devices

    if zero_gpu:
        names = ["cuda"]  # ZeroGPU attaches one GPU per call; CUDA is emulated outside the call
    elif devices is None and not has_gpu:
        names = ["cpu"]
    else:
        names = parse_devices(devices)
    return DevicePool(names)
