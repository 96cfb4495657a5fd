"""The plugin's reader, writers and samples through napari itself (viewer.open / layer.save / open_sample)."""

from __future__ import annotations

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from conftest import disks  # noqa: E402
from napari_nuclei_unet._reader import get_reader  # noqa: E402
from napari_nuclei_unet.rle import write_csv  # noqa: E402

PLUGIN = "napari-nuclei-unet"


def test_rle_csv_round_trip_through_the_viewer(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    first = disks()
    second = disks(shape=(40, 50), centres=((20, 20),), radius=10)
    viewer.add_labels(first, name="first")
    viewer.add_labels(second, name="second")
    path = tmp_path / "both.csv"
    written = viewer.layers.save(str(path), plugin=PLUGIN)
    assert written == [str(path)]
    viewer.layers.clear()

    viewer.open(str(path), plugin=PLUGIN)
    assert [layer.name for layer in viewer.layers] == ["first (both)", "second (both)"]
    assert np.array_equal(viewer.layers["first (both)"].data, first)
    assert np.array_equal(viewer.layers["second (both)"].data, second)
    assert viewer.layers["first (both)"].metadata["image_id"] == "first"
    viewer.add_image(np.zeros(first.shape), name="first")  # the image it belongs to, by its own name: no "[1]"
    assert [layer.name for layer in viewer.layers] == ["first (both)", "second (both)", "first"]
    again = tmp_path / "again.csv"
    viewer.layers.selection = {viewer.layers["first (both)"], viewer.layers["second (both)"]}
    viewer.layers.save(str(again), selected=True, plugin=PLUGIN)
    assert again.read_text() == path.read_text()  # saved again under the rows' own ImageIds


def test_single_labels_layer_saves_as_rle_and_as_label_images(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    labels = disks(centres=((30, 30), (60, 90), (20, 100)), radius=12)
    layer = viewer.add_labels(labels, name="cells")
    for suffix in (".csv", ".tif", ".png"):
        path = tmp_path / f"cells{suffix}"
        layer.save(str(path), plugin=PLUGIN)
        assert path.is_file()
    viewer.open(str(tmp_path / "cells.csv"), plugin=PLUGIN)
    assert np.array_equal(viewer.layers[-1].data, labels)
    import imageio.v3 as iio
    import tifffile

    assert tifffile.imread(tmp_path / "cells.tif").dtype == np.uint16
    assert np.array_equal(tifffile.imread(tmp_path / "cells.tif"), labels)
    assert np.array_equal(iio.imread(tmp_path / "cells.png"), labels)


def test_shape_from_an_image_beside_the_csv(make_napari_viewer, tmp_path):
    import tifffile

    labels = disks()
    tifffile.imwrite(tmp_path / "sample1.tif", np.zeros(labels.shape, np.uint8))
    write_csv(tmp_path / "no_shape.csv", [("sample1", labels)], with_shape=False)
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "no_shape.csv"), plugin=PLUGIN)
    assert np.array_equal(viewer.layers["sample1 (no_shape)"].data, labels)


def test_a_csv_that_is_not_rle_is_not_claimed(make_napari_viewer, tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("name,area\na,3\n")
    assert get_reader(str(path)) is None
    viewer = make_napari_viewer()
    with pytest.raises(Exception, match="table.csv"):
        viewer.open(str(path), plugin=PLUGIN)


def test_a_broken_rle_csv_names_the_row(make_napari_viewer, tmp_path):
    path = tmp_path / "broken.csv"
    path.write_text("ImageId,EncodedPixels,Height,Width\nimg,1 3,10,10\nimg,5 x,10,10\n")
    viewer = make_napari_viewer()
    with pytest.raises(Exception, match=r"broken\.csv.*row 3|row 3.*broken\.csv"):
        viewer.open(str(path), plugin=PLUGIN)
    assert len(viewer.layers) == 0


def test_writers_never_leave_partial_files(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.full((4, 300, 300), 70000, np.int32), name="too many for png")
    path = tmp_path / "out.png"
    with pytest.raises(Exception, match="PNG"):
        layer.save(str(path), plugin=PLUGIN)
    assert list(tmp_path.iterdir()) == []


def test_samples_load_without_network(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "synthetic_nuclei")
    viewer.open_sample(PLUGIN, "immunohistochemistry")
    viewer.open_sample(PLUGIN, "synthetic_volume")
    names = [layer.name for layer in viewer.layers]
    assert names == [
        "synthetic nuclei",
        "synthetic nuclei ground truth",
        "immunohistochemistry",
        "synthetic z-stack",
        "synthetic z-stack ground truth",
    ]
    assert viewer.layers["synthetic nuclei ground truth"].data.max() == 60
    assert viewer.layers["immunohistochemistry"].rgb
    volume = viewer.layers["synthetic z-stack"]
    assert volume.data.shape == (24, 192, 256) and tuple(volume.axis_labels) == ("z", "y", "x")
    assert tuple(volume.scale) == (2.0, 1.0, 1.0) and viewer.layers["synthetic z-stack ground truth"].data.max() == 40
    import tifffile

    from conftest import REPO
    from napari_nuclei_unet.synthetic import sample_field

    image, labels = sample_field()  # the files in sample_data/ are this generator's output
    assert np.array_equal(tifffile.imread(REPO / "sample_data" / "synthetic_nuclei.tif"), image)
    assert np.array_equal(tifffile.imread(REPO / "sample_data" / "synthetic_nuclei_labels.tif"), labels)


def test_rle_rows_of_segmented_layers_are_named_after_the_image(tmp_path):
    """Rows must match Kaggle ground truth, which names them by the image's file stem, not "<stem> nuclei"."""
    from napari_nuclei_unet._writer import write_rle_csv
    from napari_nuclei_unet.rle import read_csv

    labels = np.zeros((20, 30), np.int32)
    labels[2:6, 3:9], labels[10:15, 12:20] = 1, 2
    segmented = {"name": "0a7d30 nuclei", "metadata": {"nuclei_unet": {"image_id": "0a7d30"}}}
    hand_made = {"name": "my labels", "metadata": {}}
    write_rle_csv(str(tmp_path / "out.csv"), [(labels, segmented, "labels"), (labels, hand_made, "labels")])
    assert set(read_csv(tmp_path / "out.csv")) == {"0a7d30", "my labels"}


def test_a_csv_of_many_images_opens_as_one_stack_per_shape_and_saves_back_under_its_ids(make_napari_viewer, tmp_path):
    """Item 18: 576 DSB2018 images opened as 576 layers in 256 s."""
    import time

    from napari_nuclei_unet._reader import MANY_IMAGES
    from napari_nuclei_unet.rle import decode_csv

    rng = np.random.default_rng(0)
    items = []
    for index in range(3 * MANY_IMAGES):
        shape = (64, 80) if index % 3 else (48, 48)
        labels = np.zeros(shape, np.int32)
        y, x = rng.integers(8, 40, size=2)
        labels[y : y + 6, x : x + 7] = 1
        items.append((f"{index:064x}", labels))  # 64-character ids, as DSB2018's
    path = write_csv(tmp_path / "many.csv", items)
    viewer = make_napari_viewer()
    started = time.perf_counter()
    viewer.open(str(path), plugin=PLUGIN)
    took = time.perf_counter() - started
    assert [layer.name for layer in viewer.layers] == [
        f"many 64x80 ({2 * MANY_IMAGES} images)",
        f"many 48x48 ({MANY_IMAGES} images)",
    ]
    big = viewer.layers[0]
    assert big.data.shape == (2 * MANY_IMAGES, 64, 80) and len(big.metadata["image_ids"]) == 2 * MANY_IMAGES
    expected = dict(items)
    for plane, image_id in zip(big.data, big.metadata["image_ids"]):
        assert np.array_equal(plane, expected[image_id])
    assert took < 10, took
    viewer.layers.save(str(tmp_path / "again.csv"), plugin=PLUGIN)
    again = decode_csv(tmp_path / "again.csv")
    assert set(again) == set(expected) and all(np.array_equal(again[k], expected[k]) for k in expected)


def test_labels_save_as_geojson_with_their_measurements_and_open_again(make_napari_viewer, tmp_path):
    import json

    labels = disks()
    viewer = make_napari_viewer()
    layer = viewer.add_labels(
        labels, name="cells nuclei", features={"index": [1, 2], "label": [1, 2], "area": [1.0, 2.0]}
    )
    written = layer.save(str(tmp_path / "cells.geojson"), plugin=PLUGIN)
    assert written == [str(tmp_path / "cells.geojson")]
    collection = json.loads((tmp_path / "cells.geojson").read_text())
    assert [f["properties"]["measurements"] for f in collection["features"]] == [
        {"label": 1, "area": 1.0},
        {"label": 2, "area": 2.0},
    ]
    layer.features = {"index": [1, 2], "area": [1.0, 2.0]}  # as the Segment widget writes them: the label as index
    layer.save(str(tmp_path / "cells.geojson"), plugin=PLUGIN)
    collection = json.loads((tmp_path / "cells.geojson").read_text())
    assert [f["properties"]["measurements"] for f in collection["features"]] == [
        {"label": 1, "area": 1.0},
        {"label": 2, "area": 2.0},
    ]
    viewer.layers.clear()
    viewer.open(str(tmp_path / "cells.geojson"), plugin=PLUGIN)
    opened = viewer.layers["cells"].data  # no image beside the file: as large as the polygons reach
    height, width = opened.shape
    assert np.array_equal(opened, labels[:height, :width]) and labels[height:].max() == labels[:, width:].max() == 0
