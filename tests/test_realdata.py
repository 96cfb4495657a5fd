"""Checks on the real DSB2018 annotations (skipped when ../shared/data/dsb2018 is absent)."""

import csv
from collections import Counter

import numpy as np
import pytest

from napari_nuclei_unet.cli import main
from napari_nuclei_unet.io import read_image
from napari_nuclei_unet.rle import read_csv

pytestmark = pytest.mark.realdata


def test_decoded_object_counts_match_csv(dsb2018):
    rows = Counter(row["ImageId"] for row in csv.DictReader(open(dsb2018 / "train_labels.csv")))
    entries = read_csv(dsb2018 / "train_labels.csv")
    for image_id in sorted(rows)[:8]:
        image = read_image(dsb2018 / "images" / f"{image_id}.png")
        labels = entries[image_id].to_labels(image.shape[:2])
        assert labels.max() == rows[image_id] == len(np.unique(labels)) - 1


@pytest.mark.slow
def test_rle_cli_round_trips_the_real_csv(dsb2018, tmp_path):
    decoded = tmp_path / "labels"
    assert (
        main(
            [
                "rle",
                "decode",
                str(dsb2018 / "train_labels.csv"),
                "--images",
                str(dsb2018 / "images"),
                "--out",
                str(decoded),
            ]
        )
        == 0
    )
    assert main(["rle", "encode", str(decoded), "--out", str(tmp_path / "again.csv"), "--no-shape"]) == 0

    def rows_by_image(path):
        grouped = {}
        for row in csv.DictReader(open(path)):
            grouped.setdefault(row["ImageId"], set()).add(row["EncodedPixels"])
        return grouped

    original, again = rows_by_image(dsb2018 / "train_labels.csv"), rows_by_image(tmp_path / "again.csv")
    assert original.keys() == again.keys()
    different = [k for k in original if original[k] != again[k]]
    # The only differences allowed: the few images where two annotations claim the same pixel
    # (9 pixels in 6 images); the label image gives such a pixel to the first nucleus.
    entries = read_csv(dsb2018 / "train_labels.csv")
    for image_id in different:
        shape = read_image(dsb2018 / "images" / f"{image_id}.png").shape[:2]
        entries[image_id].to_labels(shape)
        assert entries[image_id].overlap_pixels > 0, image_id
        assert len(original[image_id]) == len(again[image_id])
    assert len(different) <= 6


def test_image_types_of_the_val_split(dsb2018):
    """The three DSB2018 image types, checked by looking at them: 53 fluorescence, 4 grey brightfield, 10 stained
    tissue."""
    from napari_nuclei_unet.data import image_kind, image_type, load_pairs, read_split

    split = read_split(dsb2018 / "split.csv")
    names = sorted(k for k, v in split.items() if v == "val")
    images = [s.image for s in load_pairs(dsb2018 / "images", dsb2018 / "train_labels.csv", set(names))]
    types = [image_type(image) for image in images]
    assert {t: types.count(t) for t in set(types)} == {"fluorescence": 53, "brightfield": 4, "tissue": 10}
    for image in (image for image, kind in zip(images, types) if kind == "fluorescence"):
        grey = image[..., :3].mean(-1) if image.ndim == 3 else image
        for tint in ((0, 0, 1), (0, 1, 0), (1, 0.2, 0.6)):  # pseudo-colours (Hoechst blue, GFP green) stay fluorescence
            assert image_type((grey[..., None] * np.array(tint)).astype(np.uint8)) == "fluorescence"
    grey_dark = np.zeros((64, 64), np.uint8)
    grey_dark[20:30, 20:30] = 200
    assert image_type(grey_dark) == image_kind(grey_dark) == "fluorescence"
    assert image_type(255 - grey_dark) == image_kind(255 - grey_dark) == "brightfield"
