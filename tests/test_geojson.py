"""GeoJSON polygons: exact round trips, QuPath's fields, files that validate against the GeoJSON schema
(geojson-pydantic) and RFC 7946's ring rules."""

import json

import numpy as np
import pytest

from napari_nuclei_unet.errors import InputError
from napari_nuclei_unet.geojson import features_to_labels, labels_to_features, read_geojson, write_geojson


def _check_rfc7946(feature):
    """What RFC 7946 asks of a Polygon's rings: closed, at least 4 positions, no repeated neighbours."""
    geometry = feature["geometry"]
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    for polygon in polygons:
        for ring in polygon:
            assert len(ring) >= 4 and ring[0] == ring[-1]
            assert all(a != b for a, b in zip(ring, ring[1:]))


def test_labels_round_trip_exactly_through_geojson(tmp_path):
    from napari_nuclei_unet.synthetic import nuclei_field

    _image, labels = nuclei_field((160, 200), count=40, diameter=16, seed=3)
    labels = labels.astype(np.int32)
    labels[150:158, 5:13] = 900  # a nucleus with a hole
    labels[153:155, 8:10] = 0
    labels[0:3, 196:200] = 901  # at the image's corner
    features = labels_to_features(labels, {"label": np.array([900]), "area": np.array([60.0])})
    assert len(features) == len(np.unique(labels)) - 1
    for feature in features:
        _check_rfc7946(feature)
        assert (
            feature["properties"]["objectType"] == "detection"
            and feature["properties"]["classification"]["name"] == "Nucleus"
        )
    holed = next(f for f in features if f["properties"]["measurements"]["label"] == 900)
    assert holed["geometry"]["type"] == "Polygon" and len(holed["geometry"]["coordinates"]) == 2  # exterior + hole
    assert holed["properties"]["measurements"]["area"] == 60.0
    exterior = np.array(holed["geometry"]["coordinates"][0])
    assert (
        exterior[:, 0].min() == 5
        and exterior[:, 0].max() == 13
        and exterior[:, 1].min() == 150
        and exterior[:, 1].max() == 158
    )  # pixel edges
    assert np.array_equal(features_to_labels(features, labels.shape), labels)
    path = write_geojson(tmp_path / "cells.geojson", labels)
    assert json.loads(path.read_text())["type"] == "FeatureCollection"
    from geojson_pydantic import FeatureCollection  # the GeoJSON schema (RFC 7946) as pydantic models

    collection = FeatureCollection.model_validate_json(path.read_text())
    assert len(collection.features) == len(features) and {f.geometry.type for f in collection.features} == {"Polygon"}
    assert np.array_equal(read_geojson(path, labels.shape), labels)
    assert read_geojson(path).shape == (158, 200)  # without a shape: just large enough for every polygon


def test_diagonal_pixels_become_a_multipolygon_and_round_trip():
    labels = np.zeros((6, 6), np.int32)
    labels[1, 1] = labels[2, 2] = 4
    (feature,) = labels_to_features(labels)
    assert feature["geometry"]["type"] == "MultiPolygon" and len(feature["geometry"]["coordinates"]) == 2
    _check_rfc7946(feature)
    from geojson_pydantic import Feature

    assert Feature.model_validate(feature).geometry.type == "MultiPolygon"
    assert np.array_equal(features_to_labels([feature], labels.shape), labels)


def test_qupath_lists_and_bad_files(tmp_path):
    square = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [4, 1], [4, 3], [1, 3], [1, 1]]]},
        "properties": {"objectType": "annotation"},
    }
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [2, 2]}, "properties": {}}
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps([square, point]))  # QuPath may export a bare list of features
    labels = read_geojson(path, (5, 6))
    assert labels[1:3, 1:4].tolist() == [[1, 1, 1], [1, 1, 1]] and labels.sum() == 6
    (tmp_path / "broken.geojson").write_text("{not json")
    with pytest.raises(InputError, match="broken.geojson"):
        read_geojson(tmp_path / "broken.geojson")
    bad = dict(square, geometry={"type": "Polygon", "coordinates": [["x", "y"]]})
    (tmp_path / "bad.geojson").write_text(json.dumps([bad]))
    with pytest.raises(InputError, match="bad.geojson"):
        read_geojson(tmp_path / "bad.geojson", (5, 5))
