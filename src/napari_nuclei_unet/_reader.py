"""napari reader for Kaggle RLE CSV files: one Labels layer per ImageId, or stacks for many images.

Thin: the codec is :mod:`napari_nuclei_unet.rle`. A CSV without the RLE columns is not
claimed (``None``), so other readers can try it. (npe2 matches readers by file name only,
so napari still lists this reader for every ``.csv`` in File > Open's reader choice.)

Hundreds of layers make napari unusable (minutes to open, and a layer list nobody can
scroll). Above :data:`MANY_IMAGES` images, the images of each shape become
one stacked Labels layer: plane ``i`` is ``metadata["image_ids"][i]``, which the RLE writer
uses to name its rows again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._triton_guard import install as _install_triton_guard
from .rle import looks_like_rle_csv

_install_triton_guard()  # before anything here can import torch (see _triton_guard)


def get_reader(path):
    """Return a reader function for an RLE CSV, or None for anything else."""
    if isinstance(path, list) or not str(path).lower().endswith(".csv") or not looks_like_rle_csv(path):
        return None
    return read_rle_csv


# Up to this many images open as one layer each; more are stacked by shape.
MANY_IMAGES = 24


def read_rle_csv(path) -> list[tuple]:
    """Decode every ImageId; shapes from Height/Width, an image beside the CSV, or the Kaggle layout."""
    from .io import image_shape_lookup
    from .rle import read_csv

    path = Path(path)
    lookup = image_shape_lookup(path.parent)
    entries = read_csv(path)
    if len(entries) <= MANY_IMAGES:
        layers = []
        for image_id, entry in entries.items():
            labels = entry.to_labels(entry.shape or lookup(image_id), source=str(path))
            name = f"{image_id} ({path.stem})"  # not the image's own name: napari would make it "<name> [1]"
            layers.append((labels, {"name": name, "metadata": {"source": str(path), "image_id": image_id}}, "labels"))
        return layers
    by_shape: dict[tuple[int, int], list[str]] = {}
    for image_id, entry in entries.items():
        by_shape.setdefault(tuple(entry.shape or lookup(image_id) or ()), []).append(image_id)
    layers = []
    for shape, ids in sorted(by_shape.items(), key=lambda item: -len(item[1])):
        if len(shape) != 2:  # no shape anywhere: to_labels says so, naming the image
            entries[ids[0]].to_labels(None, source=str(path))
        stack = np.zeros((len(ids), *shape), np.int32)
        for plane, image_id in zip(stack, ids):
            plane[...] = entries[image_id].to_labels(shape, source=str(path))
        name = f"{path.stem} {shape[0]}x{shape[1]} ({len(ids)} images)"
        layers.append((stack, {"name": name, "metadata": {"source": str(path), "image_ids": ids}}, "labels"))
    return layers


def get_geojson_reader(path):
    """A reader for a ``.geojson`` file of polygons (QuPath's export, or ours), or None."""
    if isinstance(path, list) or not str(path).lower().endswith(".geojson"):
        return None
    return read_geojson_labels


def read_geojson_labels(path) -> list[tuple]:
    """One Labels layer of the polygons; its size from an image beside the file named like it, else the polygons'
    extent."""
    from .geojson import read_geojson
    from .io import image_shape_lookup

    path = Path(path)
    shape = image_shape_lookup(path.parent)(path.stem)
    labels = read_geojson(path, shape)
    return [(labels, {"name": path.stem, "metadata": {"source": str(path), "image_id": path.stem}}, "labels")]
