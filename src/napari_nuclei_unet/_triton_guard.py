"""Keep triton out of a process that already renders with Mesa's LLVM (napari under llvmpipe).

torchvision (under segmentation-models-pytorch) imports ``torch._dynamo``, which imports
triton. Loading triton's bundled LLVM after Mesa has mapped its own ``libLLVM`` for
napari's canvas crashes the process with a segmentation fault; the other order is safe.
triton only serves ``torch.compile``, which the plugin does not use.

:func:`install` puts a finder on ``sys.meta_path`` that looks at the process's mappings
at the moment triton is first imported, by whatever code, in whichever thread: with
Mesa's LLVM mapped, triton is reported absent (torch then runs without it). Every module
that napari imports for a contribution (widgets, readers, writers, samples) installs it,
so no order of opening them can reach triton first. Installing twice changes nothing.
"""

from __future__ import annotations

import importlib.abc
import sys

_GUARDED = "triton"


def mesa_llvm_mapped() -> bool:
    """Whether a ``libLLVM`` (Mesa's, for OpenGL) is mapped into this process (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libLLVM" in line for line in maps)
    except OSError:
        return False


class TritonAfterMesaFinder(importlib.abc.MetaPathFinder):
    """Refuses ``import triton`` (and its submodules) once Mesa's LLVM is mapped; otherwise stays out of the way."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] != _GUARDED or not mesa_llvm_mapped():
            return None
        sys.modules[_GUARDED] = None  # type: ignore[assignment]  # later imports and find_spec: absent
        raise ModuleNotFoundError(
            f"{_GUARDED} is not loaded beside Mesa's LLVM (it would crash this process)", name=name
        )


def install() -> None:
    """Put the finder first on ``sys.meta_path``, once per process."""
    if not any(isinstance(finder, TritonAfterMesaFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, TritonAfterMesaFinder())
