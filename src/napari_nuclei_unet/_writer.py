"""napari writers for Labels layers: Kaggle RLE CSV, and label images (.tif / .png).

Thin: the codec is :mod:`napari_nuclei_unet.rle`, files go through
:func:`napari_nuclei_unet.io.write_labels`; both write atomically (temp file + rename).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def write_rle_csv(path: str, layer_data: list[tuple[Any, dict, str]]) -> list[str]:
    """One row per label, with Height/Width. ImageId: the segmented image's file stem for layers
    the Segment widget made (as ``nuclei-unet segment`` and Kaggle name them), else the layer
    name; ``<id>_<plane>`` for stacks."""
    from .rle import write_csv

    rows = []
    for data, meta, _kind in layer_data:
        labels = np.asarray(data)
        name = ((meta.get("metadata") or {}).get("nuclei_unet") or {}).get("image_id") or meta.get("name", "labels")
        if labels.ndim == 2:
            rows.append((name, labels))
        else:
            rows.extend((f"{name}_{index}", plane) for index, plane in enumerate(labels.reshape(-1, *labels.shape[-2:])))
    return [str(write_csv(path, rows))]


def write_labels_image(path: str, data: Any, meta: dict) -> list[str]:
    """A uint16 (uint32 when needed) label image; PNG only when it fits in uint16."""
    from .io import write_labels

    return [str(write_labels(path, np.asarray(data)))]
