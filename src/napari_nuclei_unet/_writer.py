"""napari writers for Labels layers: Kaggle RLE CSV, and label images (.tif / .png).

Thin: the codec is :mod:`napari_nuclei_unet.rle`, files go through
:func:`napari_nuclei_unet.io.write_labels`; both write atomically (temp file + rename).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._triton_guard import install as _install_triton_guard

_install_triton_guard()  # before anything here can import torch (see _triton_guard)


def write_rle_csv(path: str, layer_data: list[tuple[Any, dict, str]]) -> list[str]:
    """One row per label, with Height/Width. ImageId: the segmented image's file stem for layers
    the Segment widget made (as ``nuclei-unet segment`` and Kaggle name them), the row's own for
    a layer read from an RLE CSV, else the layer name; for stacks, the plane's id when the reader
    stacked an RLE CSV (``image_ids``), else ``<id>_<plane>``."""
    from .rle import plane_ids, write_csv

    rows = []
    for data, meta, _kind in layer_data:
        labels = np.asarray(data)
        metadata = meta.get("metadata") or {}
        name = (
            (metadata.get("nuclei_unet") or {}).get("image_id")  # made by the Segment widget
            or metadata.get("image_id")  # read from an RLE CSV
            or meta.get("name", "labels")
        )
        if labels.ndim == 2:
            rows.append((name, labels))
            continue
        planes = labels.reshape(-1, *labels.shape[-2:])
        ids = metadata.get("image_ids")
        ids = ids if isinstance(ids, list) and len(ids) == len(planes) else plane_ids(name, labels.shape[:-2])
        rows.extend(zip(ids, planes))
    return [str(write_csv(path, rows))]


def write_labels_image(path: str, data: Any, meta: dict) -> list[str]:
    """A uint16 (uint32 when needed) label image; PNG only when it fits in uint16."""
    from .io import write_labels

    return [str(write_labels(path, np.asarray(data)))]


def write_geojson_polygons(path: str, data: Any, meta: dict) -> list[str]:
    """One GeoJSON Feature per nucleus (QuPath detections), with the layer's features table as measurements."""
    from .geojson import write_geojson

    labels = np.asarray(data)
    if labels.ndim != 2:
        from .errors import InputError

        raise InputError(f"{path}: GeoJSON holds one 2D plane; this layer is {labels.ndim}D")
    return [str(write_geojson(path, labels, _measurements(path, labels, meta)))]


def _measurements(path: str, labels: np.ndarray, meta: dict) -> dict | None:
    """The layer's features table as ``{column: values}`` with a ``label`` column, if it describes these labels.

    A layer the Segment widget wrote records which labels its table was measured on. Saved before the table of its
    latest labels is there (just re-labelled or edited), that table would give nuclei another's numbers: their
    shapes are measured here instead (the writer has no image, so no intensities), and a warning says so."""
    ours = (meta.get("metadata") or {}).get("nuclei_unet") or {}
    if ours.get("measured"):  # a nuclei layer whose table the widget keeps
        from .measure import fingerprint, measure

        if ours.get("table") != fingerprint(labels):
            import warnings

            warnings.warn(
                f"{path}: the nuclei's measurements table was not up to date with their labels; their shapes were "
                "measured again for the file, without the intensity columns",
                stacklevel=2,
            )
            return measure(labels, None, ours.get("pixel_size"))
    features = meta.get("features")
    key = next((name for name in ("label", "index") if features is not None and name in features), None)
    if key is None or not len(features):  # napari's convention: "index" is the label a row describes
        return None
    others = {str(c): np.asarray(features[c]) for c in features.columns if c not in ("index", "label")}
    return {"label": np.asarray(features[key]), **others}
