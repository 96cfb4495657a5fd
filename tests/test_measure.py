"""Per-nucleus measurements: hand-checked values, regionprops' own numbers, and strips that equal the whole plane."""

import numpy as np
import pytest

from napari_nuclei_unet.errors import InputError
from napari_nuclei_unet.measure import measure, write_measurements_csv


def _hand_checked():
    labels = np.zeros((10, 12), np.int32)
    labels[2:6, 3:8] = 1  # 4 x 5 rectangle: area 20, centroid (3.5, 5.0)
    labels[8, 0:3] = 3  # a 1 x 3 bar: area 3, centroid (8, 1)
    image = np.zeros((10, 12), np.float32)
    image[2:6, 3:8] = 2.0
    image[2, 3] = 10.0  # max of nucleus 1; its mean is (19 * 2 + 10) / 20 = 2.4
    image[8, 0:3] = [1.0, 2.0, 3.0]
    return labels, image


def test_hand_checked_values_and_regionprops_agree():
    from skimage.measure import regionprops

    labels, image = _hand_checked()
    table = measure(labels, image, pixel_size=0.5)
    assert table["label"].tolist() == [1, 3]
    assert table["area"].tolist() == [20, 3]
    assert table["centroid_y"].tolist() == [3.5, 8.0] and table["centroid_x"].tolist() == [5.0, 1.0]
    assert table["mean_intensity"].tolist() == pytest.approx([2.4, 2.0]) and table["max_intensity"].tolist() == [
        10.0,
        3.0,
    ]
    assert table["integrated_intensity"].tolist() == pytest.approx([48.0, 6.0])
    assert table["area_um2"].tolist() == pytest.approx([5.0, 0.75]) and table[
        "centroid_x_um"
    ].tolist() == pytest.approx([2.5, 0.5])
    for row, region in enumerate(regionprops(labels, intensity_image=image)):
        assert table["perimeter"][row] == pytest.approx(region.perimeter)
        assert table["equivalent_diameter"][row] == pytest.approx(region.equivalent_diameter_area)
        assert table["eccentricity"][row] == pytest.approx(region.eccentricity)
        assert table["solidity"][row] == pytest.approx(region.solidity)
        assert table["equivalent_diameter_um"][row] == pytest.approx(region.equivalent_diameter_area * 0.5)


def test_every_column_is_regionprops_on_touching_odd_shaped_nuclei():
    """The table is computed for all labels at once (not region by region): it must give regionprops' numbers on
    nuclei that touch each other and the image's edges, with holes, single pixels, lines and diagonal contacts."""
    from skimage.measure import regionprops_table

    from napari_nuclei_unet.synthetic import nuclei_field

    image, labels = nuclei_field((160, 200), count=60, diameter=16, seed=5)
    labels = labels.astype(np.int32)
    top = int(labels.max())
    labels[0:9, 0:30] = top + 1  # along two image edges
    labels[4, 10:20] = 0  # a slit
    labels[20, 190] = top + 2  # one pixel
    labels[30:31, 150:200] = top + 3  # a one-pixel line to the right edge
    labels[150:160, 0:10] = top + 4
    labels[153:157, 3:7] = 0  # a hole
    labels[140:150, 10:20] = top + 5  # touches top + 4 at a corner only
    labels[labels == 7] = 0  # a missing label number
    colour = np.stack([image, 255 - image, image // 3], axis=-1).astype(np.uint8)
    table = measure(labels, colour)
    reference = regionprops_table(
        labels,
        intensity_image=colour,
        properties=("label", "centroid", "area", "perimeter", "equivalent_diameter_area", "eccentricity", "solidity",
                    "intensity_mean", "intensity_max"),
    )  # fmt: skip
    renamed = {
        "centroid-0": "centroid_y",
        "centroid-1": "centroid_x",
        "equivalent_diameter_area": "equivalent_diameter",
    }
    for key, values in reference.items():
        if key.startswith("intensity_"):
            kind, channel = key[len("intensity_") :].split("-")
            key = f"{kind}_intensity_{channel}"
        assert np.allclose(table[renamed.get(key, key)], values, rtol=1e-9, atol=1e-12), key
    assert np.allclose(table["integrated_intensity_1"], table["mean_intensity_1"] * table["area"])


def test_strips_give_the_whole_planes_table():
    """Nuclei across strip borders, and one taller than the first look below a strip, are measured whole, once."""
    from napari_nuclei_unet.synthetic import nuclei_field

    image, labels = nuclei_field((400, 96), count=40, diameter=18, seed=2)
    labels = labels.astype(np.int32)
    labels[50:390, 80:90] = labels.max() + 1  # 340 rows tall: beyond the first 256-row look
    colour = np.stack([image, image // 2, image // 3], axis=-1)
    whole = measure(labels, colour, block_rows=10_000)
    strips = measure(labels, colour, block_rows=64)
    assert list(strips) == list(whole) and "mean_intensity_2" in whole
    assert strips["label"].tolist() == whole["label"].tolist() == sorted(set(np.unique(labels).tolist()) - {0})
    for key in whole:
        assert np.allclose(strips[key], whole[key]), key


def test_bad_input_and_the_csv(tmp_path):
    labels, image = _hand_checked()
    with pytest.raises(InputError, match="does not match"):
        measure(labels, image[:5])
    with pytest.raises(InputError, match="2D"):
        measure(labels[None])
    path = tmp_path / "cells_nuclei.csv"
    write_measurements_csv(path, measure(labels, image))
    lines = path.read_text().splitlines()
    assert (
        lines[0].startswith("label,centroid_y,centroid_x,area,")
        and len(lines) == 3
        and lines[1].startswith("1,3.5,5,20,")
    )
    empty = measure(np.zeros((8, 8), np.int32))
    assert empty["label"].size == 0
