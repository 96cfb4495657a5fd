"""napari reader for Kaggle RLE CSV files: one Labels layer per ImageId.

Thin: the codec is :mod:`napari_nuclei_unet.rle`. A CSV without the RLE columns is not
claimed (``None``), so other readers can try it.
"""

from __future__ import annotations

from pathlib import Path

from .rle import looks_like_rle_csv


def get_reader(path):
    """Return a reader function for an RLE CSV, or None for anything else."""
    if isinstance(path, list) or not str(path).lower().endswith(".csv") or not looks_like_rle_csv(path):
        return None
    return read_rle_csv


def read_rle_csv(path) -> list[tuple]:
    """Decode every ImageId; shapes from Height/Width, an image beside the CSV, or the Kaggle layout."""
    from .io import image_shape_lookup
    from .rle import read_csv

    path = Path(path)
    lookup = image_shape_lookup(path.parent)
    layers = []
    for image_id, entry in read_csv(path).items():
        labels = entry.to_labels(entry.shape or lookup(image_id), source=str(path))
        layers.append((labels, {"name": image_id, "metadata": {"source": str(path), "image_id": image_id}}, "labels"))
    return layers
