"""Label images as users bring them: named as other tools save them, beside their images, or as binary masks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile

from napari_nuclei_unet.cli import main
from napari_nuclei_unet.data import load_pairs, read_labels
from napari_nuclei_unet.errors import InputError
from napari_nuclei_unet.synthetic import nuclei_field


def _write_pairs(images, labels, suffix: str, count: int = 2) -> dict[str, np.ndarray]:
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    truth = {}
    for index in range(count):
        image, label = nuclei_field((96, 96), count=6, diameter=14, seed=index)
        tifffile.imwrite(images / f"cells{index}.tif", image)
        tifffile.imwrite(labels / f"cells{index}{suffix}.tif", label.astype(np.uint16))
        truth[f"cells{index}"] = label
    return truth


@pytest.mark.parametrize("suffix", ["_masks", "_cp_masks", "_labels", "_Mask", ""])
def test_labels_in_their_own_folder_pair_by_name_with_or_without_a_tools_suffix(tmp_path, suffix):
    truth = _write_pairs(tmp_path / "images", tmp_path / "labels", suffix)
    pairs = load_pairs(tmp_path / "images", tmp_path / "labels")
    assert [p.name for p in pairs] == sorted(truth)
    for pair in pairs:
        assert np.array_equal(pair.labels, truth[pair.name])


def test_cellposes_layout_images_and_masks_in_one_folder_never_pairs_an_image_with_itself(tmp_path):
    """Before: every file was paired with itself, the raw images trained on as labels, without a word."""
    truth = _write_pairs(tmp_path / "data", tmp_path / "data", "_masks", count=3)
    pairs = load_pairs(tmp_path / "data", tmp_path / "data")
    assert [p.name for p in pairs] == sorted(truth)
    for pair in pairs:
        assert np.array_equal(pair.labels, truth[pair.name])
        assert pair.image.dtype != np.int32 and not np.array_equal(pair.image, pair.labels)
    tifffile.imwrite(tmp_path / "data" / "unlabelled.tif", np.zeros((96, 96), np.uint8))
    assert [p.name for p in load_pairs(tmp_path / "data", tmp_path / "data")] == sorted(truth)
    lone = tmp_path / "lone"
    lone.mkdir()
    tifffile.imwrite(lone / "a.tif", np.zeros((96, 96), np.uint8))
    with pytest.raises(InputError, match="_masks"):
        load_pairs(lone, lone)


def test_two_label_files_for_one_image_are_an_error_naming_both(tmp_path):
    _write_pairs(tmp_path / "images", tmp_path / "labels", "_masks", count=1)
    tifffile.imwrite(tmp_path / "labels" / "cells0_labels.tif", np.zeros((96, 96), np.uint16))
    with pytest.raises(InputError, match="cells0_labels.tif.*cells0"):
        load_pairs(tmp_path / "images", tmp_path / "labels")


def test_a_binary_mask_is_read_as_its_separate_regions_with_a_warning(tmp_path, caplog):
    mask = np.zeros((40, 60), np.uint8)
    mask[5:15, 5:15] = 255
    mask[20:30, 30:50] = 255
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    with caplog.at_level(logging.WARNING):
        labels = read_labels(tmp_path / "mask.tif")
    assert labels.dtype == np.int32 and sorted(np.unique(labels)) == [0, 1, 2]
    assert set(np.unique(labels[5:15, 5:15])) == {1} and set(np.unique(labels[20:30, 30:50])) == {2}
    assert "mask.tif" in caplog.text and "2 separate regions" in caplog.text
    one = np.zeros((40, 60), np.uint16)
    one[5:15, 5:15] = 7  # one nucleus keeps its ID
    tifffile.imwrite(tmp_path / "one.tif", one)
    assert np.array_equal(read_labels(tmp_path / "one.tif"), one.astype(np.int32))


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((40, 60, 3), 128, np.uint8), "colour picture"),
        (np.linspace(0, 1, 2400, dtype=np.float32).reshape(40, 60), "whole numbers"),
        (np.full((40, 60), np.nan, np.float32), "whole numbers"),
        (-np.ones((40, 60), np.int16), "negative"),
    ],
)
def test_what_cannot_be_labels_is_one_line_naming_the_file(tmp_path, array, message):
    tifffile.imwrite(tmp_path / "bad.tif", array)
    with pytest.raises(InputError, match=f"bad.tif.*{message}"):
        read_labels(tmp_path / "bad.tif")


def test_evaluate_takes_cellpose_named_truth_and_binary_predictions(tmp_path, capsys, caplog):
    truth = _write_pairs(tmp_path / "data", tmp_path / "data", "_masks", count=2)
    (tmp_path / "pred").mkdir()
    for name, labels in truth.items():  # a semantic prediction: every nucleus one value
        tifffile.imwrite(tmp_path / "pred" / f"{name}.tif", (labels > 0).astype(np.uint8))
    with caplog.at_level(logging.WARNING):
        code = main(["evaluate", "--truth", str(tmp_path / "data"), "--pred", str(tmp_path / "pred")])
    out, err = capsys.readouterr()
    assert code == 0 and "no prediction" not in err and "separate regions" in caplog.text
    row = next(line for line in out.splitlines() if line.startswith("pred"))
    true, found = (int(n) for n in row.split("|")[-1].split("/"))
    assert true == sum(int(t.max()) for t in truth.values()) and found >= 0.8 * true  # regions, not 1 per image


def test_zarr_label_stores_are_scored_and_encoded_as_label_images_are(tmp_path, capsys):
    """`segment --out-format zarr` writes label stores; evaluate and rle encode read none ("no image in common")."""
    import zarr

    truth = _write_pairs(tmp_path / "images", tmp_path / "truth", "")
    (tmp_path / "pred").mkdir()
    for name, labels in truth.items():
        store = zarr.open_array(str(tmp_path / "pred" / f"{name}.zarr"), mode="w", shape=labels.shape, dtype="int32")
        store[:] = labels
    code = main(["evaluate", "--truth", str(tmp_path / "truth"), "--pred", str(tmp_path / "pred")])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("pred"))
    assert code == 0 and float(row.split("|")[1]) == 1.0
    assert main(["rle", "encode", str(tmp_path / "pred"), "--out", str(tmp_path / "pred.csv")]) == 0
    assert {line.split(",")[0] for line in (tmp_path / "pred.csv").read_text().splitlines()[1:]} == set(truth)


def test_training_pairs_images_with_zarr_label_stores(tmp_path):
    import zarr

    truth = _write_pairs(tmp_path / "images", tmp_path / "tiffs", "")
    (tmp_path / "labels").mkdir()
    for name, labels in truth.items():
        store = zarr.open_array(str(tmp_path / "labels" / f"{name}.zarr"), mode="w", shape=labels.shape, dtype="int32")
        store[:] = labels
    pairs = load_pairs(tmp_path / "images", tmp_path / "labels")
    assert [p.name for p in pairs] == sorted(truth) and all(np.array_equal(p.labels, truth[p.name]) for p in pairs)
