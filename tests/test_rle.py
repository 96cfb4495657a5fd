import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from napari_nuclei_unet import RLEError
from napari_nuclei_unet.rle import (
    decode,
    decode_csv,
    encode,
    labels_to_rles,
    looks_like_rle_csv,
    read_csv,
    write_csv,
)


def test_known_kaggle_example():
    # Kaggle's own example: '1 3' is pixels 1,2,3; '10 5' is 10..14, numbered top to bottom, then left to right.
    mask = decode("1 3 10 5", (6, 4))
    flat = mask.ravel(order="F")
    assert np.flatnonzero(flat).tolist() == [0, 1, 2, 9, 10, 11, 12, 13]
    assert mask[:3, 0].all() and not mask[3:, 0].any()  # first column, rows 0..2
    assert mask[3:, 1].all() and mask[:2, 2].all()  # pixels 10..14: rows 3..5 of column 1, rows 0..1 of column 2
    assert encode(mask) == "1 3 10 5"


def test_column_major_order():
    mask = np.zeros((3, 5), bool)
    mask[0, 1] = True  # row 0, column 1 -> pixel 1*3 + 0 + 1 = 4
    assert encode(mask) == "4 1"


@settings(max_examples=200, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 12), st.integers(1, 12))))
def test_mask_round_trip(mask):
    assert np.array_equal(decode(encode(mask), mask.shape), mask)


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((5, 7), bool),
        np.ones((5, 7), bool),
        np.pad(np.ones((1, 7), bool), ((2, 2), (0, 0))),  # a full row
        np.pad(np.ones((5, 1), bool), ((0, 0), (3, 3))),  # a full column
    ],
    ids=["empty", "full", "full-row", "full-column"],
)
def test_edge_cases_round_trip(mask):
    rle = encode(mask)
    assert np.array_equal(decode(rle, mask.shape), mask)
    if not mask.any():
        assert rle == ""


@settings(max_examples=100, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 10), st.integers(1, 10)), elements=st.integers(0, 4)))
def test_label_image_csv_round_trip(tmp_path_factory, labels):
    from skimage.measure import label as connected

    # RLE rows are per nucleus: give each connected region its own id so labels are one object each.
    instances = connected(labels > 0, connectivity=1).astype(np.int32)
    path = tmp_path_factory.mktemp("rle") / "x.csv"
    write_csv(path, [("img", instances)])
    decoded = decode_csv(path)["img"]
    # Same partition, labels renumbered in row (label) order.
    assert np.array_equal(decoded > 0, instances > 0)
    assert len(np.unique(decoded)) == len(np.unique(instances))
    for value in np.unique(instances)[1:]:
        assert len(np.unique(decoded[instances == value])) == 1


def test_labels_to_rles_matches_per_label_encode():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, size=(40, 30))
    rows = labels_to_rles(labels)
    assert [label for label, _ in rows] == sorted(set(np.unique(labels)) - {0})
    for label, rle in rows:
        assert rle == encode(labels == label)


def test_empty_image_keeps_a_row(tmp_path):
    path = tmp_path / "pred.csv"
    write_csv(path, [("empty", np.zeros((4, 5), np.uint16)), ("one", np.pad(np.ones((2, 2), np.uint16), 1))])
    lines = path.read_text().splitlines()
    assert lines[0] == "ImageId,EncodedPixels,Height,Width"
    assert lines[1] == "empty,,4,5"
    images = read_csv(path)
    assert list(images) == ["empty", "one"]
    assert images["empty"].rles == [] and images["empty"].shape == (4, 5)
    assert decode_csv(path)["empty"].shape == (4, 5)


def test_extra_columns_ignored_and_shape_callback(tmp_path):
    path = tmp_path / "sol.csv"
    path.write_text("ImageId,EncodedPixels,Usage\nA,1 2,Public\nA,5 1,Public\n")
    labels = decode_csv(path, shape_of=lambda image_id: (3, 3))["A"]
    assert labels.ravel(order="F").tolist() == [1, 1, 0, 0, 2, 0, 0, 0, 0]


def test_rows_claiming_the_same_pixel_first_row_wins(tmp_path):
    path = tmp_path / "overlap.csv"
    path.write_text("ImageId,EncodedPixels,Height,Width\nA,1 3,3,3\nA,3 2,3,3\n")
    entry = read_csv(path)["A"]
    labels = entry.to_labels()
    assert labels.ravel(order="F").tolist()[:4] == [1, 1, 1, 2]
    assert entry.overlap_pixels == 1


@pytest.mark.parametrize(
    "body, message",
    [
        ("A,1 2 3,2,2", "row 2 (ImageId 'A'): odd number of values"),
        ("A,1 x,2,2", "row 2 (ImageId 'A'): non-numeric value 'x'"),
        ("A,3 5,2,2", "row 2 (ImageId 'A'): run ends at pixel 7, beyond the 2x2 image"),
        ("A,0 1,2,2", "row 2 (ImageId 'A'): start 0 is below 1"),
        ("A,1 2 2 1,2,2", "row 2 (ImageId 'A'): runs overlap"),
        ("A,1 0,2,2", "row 2 (ImageId 'A'): run length 0 is not positive"),
    ],
)
def test_malformed_rows_name_file_and_row(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text("ImageId,EncodedPixels,Height,Width\n" + body + "\n")
    with pytest.raises(RLEError) as info:
        decode_csv(path)
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_shape_is_an_error(tmp_path):
    path = tmp_path / "noshape.csv"
    path.write_text("ImageId,EncodedPixels\nB,1 1\n")
    with pytest.raises(RLEError, match=r"noshape.csv: ImageId 'B': image shape unknown"):
        decode_csv(path)


def test_non_rle_csv_rejected(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n1,2\n")
    assert not looks_like_rle_csv(path)
    with pytest.raises(RLEError, match="missing column"):
        read_csv(path)


def test_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("previous content")

    def items():
        yield "a", np.ones((2, 2), np.uint8)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_csv(path, items())
    assert path.read_text() == "previous content"
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_a_csv_saved_by_a_spreadsheet_with_another_delimiter_reads_the_same(tmp_path, delimiter):
    """Excel in many locales saves CSVs with semicolons (and a BOM, and CRLF): they were 'not an RLE CSV'."""
    labels = np.zeros((20, 30), np.int32)
    labels[2:6, 3:9], labels[10:15, 12:20] = 1, 2
    comma = write_csv(tmp_path / "comma.csv", [("img", labels)])
    other = tmp_path / "other.csv"
    other.write_text(comma.read_text().replace(",", delimiter), encoding="utf-8-sig", newline="\r\n")
    assert looks_like_rle_csv(other)
    assert np.array_equal(decode_csv(other)["img"], decode_csv(comma)["img"])
