"""Nuclei as GeoJSON polygons, as QuPath reads and writes them: one Feature per nucleus.

Coordinates are pixels with the origin at the image's top-left corner (QuPath's
convention: pixel ``(row, col)`` covers ``[col, col + 1] x [row, row + 1]``), and each outline
runs along pixel edges. A nucleus is a Polygon (its holes kept as inner rings), or a
MultiPolygon when its pixels only touch diagonally. Each Feature carries
``"objectType": "detection"``, a ``classification`` and, under ``measurements``, the label and
whatever per-nucleus numbers are given (``measure.measure``).

Reading rasterises the polygons back by pixel centres, so labels -> GeoJSON -> labels is
exact for simply connected nuclei (and for nuclei with holes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import InputError

CLASSIFICATION = {"name": "Nucleus", "color": [255, 0, 0]}


def labels_to_features(labels: np.ndarray, measurements: dict[str, np.ndarray] | None = None) -> list[dict]:
    """One GeoJSON Feature per nonzero label of a 2D label image, ordered by label."""
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise InputError(f"GeoJSON needs a 2D label image, got shape {labels.shape}")
    rows = {}
    if measurements is not None and len(measurements.get("label", [])):
        columns = [c for c in measurements if c != "label"]
        rows = {int(v): {c: float(measurements[c][i]) for c in columns} for i, v in enumerate(measurements["label"])}
    features = []
    for value, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        polygons = _polygons(labels[box] == value, box[0].start, box[1].start)
        geometry = (
            {"type": "Polygon", "coordinates": polygons[0]}
            if len(polygons) == 1
            else {"type": "MultiPolygon", "coordinates": polygons}
        )
        properties = {
            "objectType": "detection",
            "classification": dict(CLASSIFICATION),
            "measurements": {"label": value, **rows.get(value, {})},
        }
        features.append({"type": "Feature", "id": f"nucleus-{value}", "geometry": geometry, "properties": properties})
    return features


def _polygons(mask: np.ndarray, top: int, left: int) -> list[list[list[list[float]]]]:
    """The mask's 4-connected parts as polygons ``[exterior, *holes]`` in image corner coordinates."""
    from scipy import ndimage as ndi

    parts, count = ndi.label(mask)
    polygons = []
    for part in range(1, count + 1):
        piece = parts == part
        filled = ndi.binary_fill_holes(piece)
        rings = [_ring(filled, top, left, exterior=True)]
        holes, hole_count = ndi.label(filled & ~piece)
        rings += [_ring(holes == h, top, left, exterior=False) for h in range(1, hole_count + 1)]
        polygons.append(rings)
    return polygons


def _ring(region: np.ndarray, top: int, left: int, exterior: bool) -> list[list[float]]:
    """The outline of a 4-connected, hole-free region along pixel edges: a closed ring of ``[x, y]``.

    Marching squares on the region doubled in size runs along the original pixel edges, with
    each corner cut by a quarter pixel; snapping the points to the edge grid restores the
    corners. Exterior rings run counter-clockwise on screen (y down), holes clockwise.
    """
    from skimage.measure import approximate_polygon, find_contours

    doubled = np.pad(np.kron(region, np.ones((2, 2), bool)), 1)
    contour = max(find_contours(doubled.astype(np.float32), 0.5), key=len)
    # doubled (padded) pixel index -> original corner coordinate; edges land on integers
    points = np.round((contour - 1 + 0.5) / 2.0)
    points = points[np.r_[True, np.any(np.diff(points, axis=0) != 0, axis=1)]]  # corners cut twice -> once
    points = approximate_polygon(points, tolerance=0)  # drop points along straight edges
    xy = np.stack([points[:, 1] + left, points[:, 0] + top], axis=1)
    if not np.array_equal(xy[0], xy[-1]):
        xy = np.vstack([xy, xy[:1]])
    area = 0.5 * np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1])  # > 0: clockwise on screen (y down)
    if (area > 0) == exterior:
        xy = xy[::-1]
    return xy.tolist()


def features_to_labels(features: list[dict], shape: tuple[int, int], source: str = "GeoJSON") -> np.ndarray:
    """Rasterise polygons into an int32 label image: a pixel belongs to a polygon whose outline
    holds its centre. Labels come from ``measurements.label`` when present, else 1, 2, … in order."""
    from skimage.draw import polygon as fill

    labels = np.zeros(shape, np.int32)
    for index, feature in enumerate(features, start=1):
        geometry = (feature or {}).get("geometry") or {}
        kind, coordinates = geometry.get("type"), geometry.get("coordinates")
        if kind not in ("Polygon", "MultiPolygon") or not coordinates:
            continue  # points, lines and empty geometries are not nuclei
        measurements = ((feature.get("properties") or {}).get("measurements")) or {}
        value = (
            int(measurements["label"])
            if isinstance(measurements, dict) and isinstance(measurements.get("label"), int | float)
            else index
        )
        try:
            for polygon in [coordinates] if kind == "Polygon" else coordinates:
                inside = np.zeros(shape, bool)
                for number, ring in enumerate(polygon):
                    ring = np.asarray(ring, dtype=np.float64)
                    rows, cols = fill(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape)  # pixel centres inside the outline
                    inside[rows, cols] = number == 0
                labels[inside] = value
        except (TypeError, ValueError, IndexError) as error:
            raise InputError(f"{source}: feature {index} has malformed coordinates ({error})") from None
    return labels


def write_geojson(
    path: str | os.PathLike, labels: np.ndarray, measurements: dict[str, np.ndarray] | None = None
) -> Path:
    """A FeatureCollection of the nuclei, written atomically."""
    from .io import atomic_write

    collection = {"type": "FeatureCollection", "features": labels_to_features(labels, measurements)}
    with atomic_write(Path(path), "w") as handle:
        json.dump(collection, handle)
    return Path(path)


def read_geojson(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The label image of a GeoJSON file (a FeatureCollection, a Feature list as QuPath exports, or one Feature).

    ``shape``: the image's; without it, just large enough for every polygon.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise InputError(f"{path}: not a readable GeoJSON file ({error})") from None
    features = data.get("features") if isinstance(data, dict) and data.get("type") == "FeatureCollection" else data
    features = [features] if isinstance(features, dict) else features
    if not isinstance(features, list):
        raise InputError(f"{path}: expected a GeoJSON FeatureCollection or a list of Features")
    if shape is None:
        extent = [0.0, 0.0]
        for feature in features:
            for x, y in _points((feature or {}).get("geometry", {}).get("coordinates")):
                extent = [max(extent[0], y), max(extent[1], x)]
        shape = (int(np.ceil(extent[0])), int(np.ceil(extent[1])))
    return features_to_labels(features, shape, source=str(path))


def _points(coordinates):
    """Every ``[x, y]`` of nested GeoJSON coordinates."""
    if (
        isinstance(coordinates, list)
        and len(coordinates) >= 2
        and all(isinstance(v, int | float) for v in coordinates[:2])
    ):
        yield float(coordinates[0]), float(coordinates[1])
    elif isinstance(coordinates, list):
        for item in coordinates:
            yield from _points(item)
