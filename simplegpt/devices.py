"""Device choice, shared by the tutorial API, the trainer, the engine's commands and checkpoint loading."""

from __future__ import annotations

import torch

from .errors import DeviceError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def default_device() -> str:
    """cuda if available, then mps, then cpu (the tutorial hard-coded 'cuda')."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' or a device name -> a torch.device that exists here; DeviceError (a ValueError) naming what to use."""
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device(default_device())
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise DeviceError(f"device {name!r} is not a device: use {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r}: CUDA is not available on this machine; use cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {str(device)!r}: MPS is not available on this machine; use cpu (or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {str(device)!r} is not supported: use {DEVICE_CHOICES}")
    return device
