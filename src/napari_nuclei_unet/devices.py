"""Where a network runs: device names a user can pick, and ``auto`` resolved (CUDA, then MPS, then CPU).

Torch is imported only when a GPU may exist: a CPU run whose exported network is on disk
never imports it.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import TYPE_CHECKING

from .errors import ModelError

if TYPE_CHECKING:
    import torch


def available_devices() -> list[str]:
    """Device names a user can pick on this machine, ``auto`` first."""
    if not _gpu_possible():
        return ["auto", "cpu"]
    import torch

    names = ["auto", "cpu"]
    names += [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def _gpu_possible() -> bool:
    """Whether torch could find a GPU here. False only when none can exist (Linux without a GPU
    driver), so that a CPU run need not import torch (seconds) just to be told so."""
    if "torch" in sys.modules:  # already loaded: asking it costs nothing
        return True
    if sys.platform.startswith("linux"):
        return any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))
    return sys.platform != "darwin" or platform.machine() == "arm64"  # Apple silicon has MPS


def device_name(device: str | torch.device = "auto") -> str:
    """:func:`resolve_device` as a name ("cpu", "cuda", "cuda:1", "mps"); torch is imported only when a GPU may
    exist."""
    if str(device) == "cpu" or (str(device) == "auto" and not _gpu_possible()):
        return "cpu"
    return str(resolve_device(device))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; a named device is checked to exist."""
    import torch

    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} requested but CUDA is not available (use --device auto or cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("device 'mps' requested but Apple MPS is not available (use --device auto or cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ModelError(f"unknown device {name!r}; use auto, cpu, cuda or mps") from None
