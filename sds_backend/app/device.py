"""Which torch device a command runs on: the name checked at start, resolved once torch is loaded.

On Apple's MPS the weights stay float32 unless float16 is asked for (guidance.resolve_dtype), and
any torch op MPS lacks runs on the CPU instead: __main__ sets PYTORCH_ENABLE_MPS_FALLBACK=1 on
macOS before torch loads.
"""
from __future__ import annotations

import re

from ..files import InputError

DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d{1,2})?")


def check_device_name(name: str) -> str:
    """`name` when it is auto, cpu, mps or cuda[:N] (checked without importing torch)."""
    if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
        raise InputError(f"device: expected auto, cpu, mps or cuda[:N], got {name!r}")
    return name


def mps_available(torch) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str, torch=None):
    """'auto' -> CUDA when torch sees a GPU, else Apple's MPS, else the CPU; a device asked for by
    name that torch does not have is an error. (`torch` is injectable for tests.)"""
    if torch is None:
        import torch

    check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available(torch) else "cpu")
    device = torch.device(name)
    if device.type == "mps" and not mps_available(torch):
        raise InputError("device: mps was asked for, but torch sees no Apple GPU (MPS) here (use --device cpu or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device: cuda was asked for, but torch sees no CUDA GPU here (use --device cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"device: {name} was asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "mps (Apple GPU)" if device.type == "mps" else "cpu"
