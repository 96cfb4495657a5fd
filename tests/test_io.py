import numpy as np
import pytest

from napari_nuclei_unet import InputError
from napari_nuclei_unet.io import (
    Normalizer,
    atomic_write,
    exact_percentiles,
    is_rgb,
    plane_count,
    planes,
    read_image,
    write_labels,
)


@pytest.mark.parametrize(
    "suffix, array",
    [
        (".png", np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 256),
        (".png", (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)),
        (".png", (np.random.default_rng(0).random((40, 50, 4)) * 255).astype(np.uint8)),
        (".jpg", (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)),
        (".tif", np.random.default_rng(0).integers(0, 65535, (3, 30, 40), dtype=np.uint16)),  # Z stack
        (".tif", np.random.default_rng(0).random((30, 40)).astype(np.float32)),
    ],
    ids=["png-8bit-grey", "png-rgb", "png-rgba", "jpeg-rgb", "tiff-16bit-stack", "tiff-float"],
)
def test_read_formats(tmp_path, suffix, array):
    import imageio.v3 as iio
    import tifffile

    path = tmp_path / f"image{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, array, photometric="minisblack")
    else:
        iio.imwrite(path, array.astype(np.uint8) if suffix == ".png" and array.dtype == np.uint16 else array)
    image = read_image(path)
    assert image.shape == array.shape
    if suffix != ".jpg":
        assert np.allclose(image, array.astype(image.dtype))


def test_layouts():
    assert is_rgb(np.zeros((10, 12, 3))) and plane_count(np.zeros((10, 12, 3))) == 1
    assert not is_rgb(np.zeros((3, 10, 12))) and plane_count(np.zeros((3, 10, 12))) == 3
    assert plane_count(np.zeros((5, 10, 12, 4))) == 5
    assert [p.shape for p in planes(np.zeros((2, 10, 12)))] == [(10, 12), (10, 12)]


def test_normalizer_percentiles_and_channels():
    rng = np.random.default_rng(0)
    sixteen_bit = rng.integers(1000, 5000, (64, 64)).astype(np.uint16)
    eight_bit = (sixteen_bit / 5000 * 255).astype(np.uint8)
    for image in (sixteen_bit, eight_bit):
        out = Normalizer.from_image(image, channels=3)(image)
        assert out.dtype == np.float32 and out.shape == (3, 64, 64)
        assert -0.05 < np.percentile(out, 1) < 0.05 and 0.95 < np.percentile(out, 99.8) < 1.05
    rgba = rng.integers(0, 255, (16, 16, 4)).astype(np.uint8)
    assert Normalizer.from_image(rgba, channels=1)(rgba).shape == (1, 16, 16)
    flat = np.full((8, 8), 7, np.uint16)
    assert np.all(Normalizer.from_image(flat)(flat) == 0)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("broken.png", b"\x89PNG\r\n\x1a\nnot really", "cannot read image"),
        ("notes.txt", b"hello", "unsupported image type '.txt'"),
        ("empty.tif", b"", "cannot read image"),
    ],
)
def test_bad_images_give_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        read_image(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "dtype, top", [(np.uint8, 2), (np.uint8, 256), (np.uint16, 9), (np.uint16, 65536), (np.float32, 1)]
)
def test_exact_percentiles_are_numpys_to_the_last_bit(dtype, top):
    """The histogram shortcut for 8- and 16-bit images gives np.percentile's numbers exactly, whatever the size and
    the percentiles (the normaliser's, and arbitrary ones between and at the ends)."""
    rng = np.random.default_rng(top)
    for size in (1, 2, 7, 1000, 12345):
        values = (rng.random((size, 3)) * top).astype(dtype)
        for q in ((1.0, 99.8), (0.0, 100.0), tuple(rng.uniform(0, 100, 5))):
            assert np.array_equal(exact_percentiles(values, q), np.percentile(values, q)), (dtype, size, q)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "nope.png")


def test_write_labels_dtypes(tmp_path):
    import tifffile

    small = np.arange(12, dtype=np.int32).reshape(3, 4)
    big = small.copy()
    big[0, 0] = 70000
    assert tifffile.imread(write_labels(tmp_path / "a.tif", small)).dtype == np.uint16
    assert tifffile.imread(write_labels(tmp_path / "b.tif", big)).dtype == np.uint32
    assert np.array_equal(read_image(write_labels(tmp_path / "c.png", small)), small)
    with pytest.raises(InputError, match="use .tif"):
        write_labels(tmp_path / "d.png", big)
    assert not (tmp_path / "d.png").exists()


@pytest.mark.parametrize("planes", [3, 4])
def test_labels_of_three_or_four_planes_are_grey_pages_not_colour(tmp_path, planes):
    """A Z-stack of 3 or 4 planes is stored as that many grey pages: as one RGB(A) image, Fiji and QuPath
    would show its labels as colour channels."""
    import tifffile

    labels = np.arange(planes * 20 * 30, dtype=np.int32).reshape(planes, 20, 30) % 500
    with tifffile.TiffFile(write_labels(tmp_path / "stack.tif", labels)) as tif:
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK
        assert len(tif.pages) == planes and np.array_equal(tif.asarray(), labels)


def test_atomic_write_keeps_old_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")
    with pytest.raises(ValueError):
        with atomic_write(path) as handle:
            handle.write(b"half")
            raise ValueError("boom")
    assert path.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_a_folder_s_hidden_files_are_not_images(tmp_path):
    """A folder copied from a Mac holds ``._<name>.png`` beside each image (resource forks): they stopped a run."""
    from napari_nuclei_unet.io import find_images

    (tmp_path / "a.png").write_bytes(b"png")
    (tmp_path / "._a.png").write_bytes(b"x")
    (tmp_path / ".hidden.tif").write_bytes(b"x")
    assert find_images([str(tmp_path)]) == [(tmp_path / "a.png").resolve()]
    assert find_images([str(tmp_path / "._a.png")]) == [(tmp_path / "._a.png").resolve()]  # named: taken


def test_transparent_pixels_do_not_count_in_the_normalisation():
    """A slide exported with a transparent, black surround: the surround pulled the low percentile to 0, and the
    tissue lost contrast (MoNuSeg tile with 40% of it transparent: 179 nuclei found where the tissue alone has 193;
    188 now)."""
    from napari_nuclei_unet.io import Normalizer

    rng = np.random.default_rng(0)
    tissue = rng.integers(120, 230, (60, 80, 3), dtype=np.uint8)
    rgba = np.dstack([tissue, np.full((60, 80), 255, np.uint8)])
    surrounded = rgba.copy()
    surrounded[:, :30] = 0  # transparent and black
    assert Normalizer.from_image(surrounded) == Normalizer.from_image(rgba[:, 30:])
    assert Normalizer.from_image(rgba) == Normalizer.from_image(tissue)  # opaque everywhere: as before


def test_a_microscope_vendors_file_says_how_to_bring_it_in(tmp_path):
    from napari_nuclei_unet.io import find_images

    (tmp_path / "slide.czi").write_bytes(b"ZISRAWFILE" + bytes(100))
    with pytest.raises(InputError, match=r"slide.czi: unsupported image type '.czi'.*OME-TIFF"):
        read_image(tmp_path / "slide.czi")
    with pytest.raises(InputError, match=r"no images found.*found .czi files.*OME-TIFF"):
        find_images([str(tmp_path)])
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "slide.czi").unlink()
    with pytest.raises(InputError, match=r"no images found \([^)]*\)$"):  # nothing said of files that are not images
        find_images([str(tmp_path)])
