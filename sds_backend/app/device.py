"""Which torch device a command runs on: the name checked at start, resolved once torch is loaded."""
from __future__ import annotations

import re

from ..files import InputError

DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d{1,2})?")


def check_device_name(name: str) -> str:
    """`name` when it is auto, cpu or cuda[:N] (checked without importing torch)."""
    if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
        raise InputError(f"device: expected auto, cpu or cuda[:N], got {name!r}")
    return name


def resolve_device(name: str):
    """'auto' -> CUDA when torch sees a GPU, else CPU; 'cuda' without one is an error."""
    import torch

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device: cuda was asked for, but torch sees no CUDA GPU here (use --device cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"device: {name} was asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"
