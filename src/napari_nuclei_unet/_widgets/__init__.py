"""The napari widgets: Segment nuclei and Fine-tune (a thin layer over the headless core)."""

from .._triton_guard import install as _install_triton_guard

_install_triton_guard()  # before any widget module can import torch (see _triton_guard)
