"""Samples under File > Open Sample; all load without network."""

from __future__ import annotations

from ._triton_guard import install as _install_triton_guard

_install_triton_guard()  # before anything here can import torch (see _triton_guard)


def immunohistochemistry() -> list[tuple]:
    """A real brightfield tissue image (hematoxylin-stained nuclei), shipped inside scikit-image's wheel."""
    from skimage import data

    image = data.immunohistochemistry()
    return [(image, {"name": "immunohistochemistry", "rgb": True}, "image")]


def synthetic_nuclei() -> list[tuple]:
    """A generated fluorescence field with touching nuclei, plus its ground-truth labels."""
    from .synthetic import sample_field

    image, labels = sample_field()
    return [
        (image, {"name": "synthetic nuclei", "colormap": "gray"}, "image"),
        (labels, {"name": "synthetic nuclei ground truth", "visible": False, "opacity": 0.5}, "labels"),
    ]


def synthetic_volume() -> list[tuple]:
    """A generated Z-stack (z step twice the pixel size), with its 3D ground-truth labels, axes and scale said."""
    from .synthetic import nuclei_volume

    image, labels = nuclei_volume(seed=2018)
    common = {"axis_labels": ("z", "y", "x"), "scale": (2.0, 1.0, 1.0)}
    return [
        (image, {"name": "synthetic z-stack", "colormap": "gray", **common}, "image"),
        (labels, {"name": "synthetic z-stack ground truth", "visible": False, "opacity": 0.5, **common}, "labels"),
    ]
