"""Files with channels (a confocal hyperstack's DAPI beside other stains, a grey PNG with alpha): the CLI
segments the nuclear channel, picked from the file's axes or --axes, guessed or given by --channel."""

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import zarr

from napari_nuclei_unet.cli import main
from napari_nuclei_unet.errors import InputError
from napari_nuclei_unet.io import channel_axis, middle_plane, nuclear_channel, read_image
from napari_nuclei_unet.params import split_channel_axis, stack_of_axes
from napari_nuclei_unet.synthetic import nuclei_field


@pytest.fixture
def model_dir(tmp_path, tiny_checkpoint):
    return tiny_checkpoint.save(tmp_path / "model")


def _nuclei_and_cytoplasm(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A nuclear stain, and a cytoplasm stain that covers most of the field with little contrast."""
    nuclei, labels = nuclei_field((96, 128), count=8, seed=seed)
    noise = np.random.default_rng(seed).normal(3000, 300, nuclei.shape)
    cytoplasm = np.clip(noise * (1 + 0.3 * (labels > 0)), 0, 65535).astype(np.uint16)
    return nuclei, cytoplasm


def _segment(paths, out, model_dir, *options) -> int:
    return main(
        ["segment", *map(str, paths), "--out", str(out), "--model", str(model_dir), "--tile-size", "64", *options]
    )


def test_axes_with_a_channel_axis_before_y_and_x():
    assert split_channel_axis("CYX") == ("YX", 0) and split_channel_axis("zcyx") == ("ZYX", 1)
    assert split_channel_axis("CZYX") == ("ZYX", 0) and split_channel_axis("YXC") == ("YXC", None)
    assert stack_of_axes("ZCYX") == "z" and stack_of_axes("CYX") == "auto" and stack_of_axes("TCYX") == "planes"


def test_where_the_channels_are():
    grey_alpha = np.zeros((40, 50, 2))
    assert channel_axis(grey_alpha, "") == 2  # two channels last: never 40 planes of 50 x 2 pixels
    assert channel_axis(np.zeros((40, 50, 1)), "") == 2  # a trailing channel axis of one
    assert channel_axis(np.zeros((2, 40, 50)), "") is None  # planes alike, the file silent: a stack
    assert channel_axis(np.zeros((2, 40, 50)), "CYX") == 0 and channel_axis(np.zeros((3, 2, 40, 50)), "ZCYX") == 1
    assert channel_axis(np.zeros((40, 50, 3)), "YXS") is None  # colour
    with pytest.raises(InputError, match="channels come before Y and X"):
        channel_axis(np.zeros((40, 50)), "", given=0)


def test_the_nuclear_channel_is_guessed_and_a_lazy_one_stays_lazy(tmp_path):
    nuclei, cytoplasm = _nuclei_and_cytoplasm()
    both = zarr.open_array(str(tmp_path / "c.zarr"), mode="w", shape=(2, 96, 128), chunks=(1, 32, 32), dtype="uint16")
    both[:] = np.stack([cytoplasm, nuclei])
    picked, index = nuclear_channel(both, 0)
    assert index == 1 and not isinstance(picked, np.ndarray)  # dask: nothing read beyond the guess's sample
    assert np.array_equal(np.asarray(picked), nuclei)
    assert nuclear_channel(both, 0, 0)[1] == 0
    assert middle_plane(np.zeros((5, 40, 50, 3))).shape == (40, 50, 3)  # a colour plane, not one of its rows
    assert middle_plane(np.zeros((5, 2, 40, 50))).shape == (40, 50)
    with pytest.raises(InputError, match="has 2 channels"):
        nuclear_channel(both, 0, 2)


def test_an_imagej_hyperstack_is_segmented_in_its_nuclear_channel(tmp_path, model_dir, capsys, caplog):
    nuclei, cytoplasm = _nuclei_and_cytoplasm()
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "two_stains.tif", np.stack([cytoplasm, nuclei]), imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(images / "nuclei_only.tif", nuclei)
    assert _segment([images], tmp_path / "out", model_dir) == 0
    captured = capsys.readouterr()
    labels = read_image(tmp_path / "out" / "two_stains.tif")
    assert labels.shape == nuclei.shape  # one labelling, not one per channel
    assert np.array_equal(labels, read_image(tmp_path / "out" / "nuclei_only.tif"))
    assert "two_stains.tif: channel 1 of 2," in captured.err and "nuclear channel 1" in captured.out
    assert "does not say" not in caplog.text  # the file's axes said it: no warning

    assert _segment([images / "two_stains.tif"], tmp_path / "other", model_dir, "--channel", "0") == 0
    assert "channel 0 of 2" in capsys.readouterr().err
    assert _segment([images / "two_stains.tif"], tmp_path / "bad", model_dir, "--channel", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    message = "channel 2 asked for, but the image has 2 channels (0 to 1)"
    assert err[-1] == f"nuclei-unet: error: {images / 'two_stains.tif'}: {message}"
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_a_z_stack_with_channels_is_labelled_in_3d_in_its_nuclear_channel(tmp_path, model_dir, capsys):
    nuclei, cytoplasm = _nuclei_and_cytoplasm()
    volume = np.stack([nuclei, nuclei, nuclei[::-1]])
    hyperstack = np.stack([np.stack([cytoplasm, plane]) for plane in volume])  # ImageJ's order: Z, C, Y, X
    tifffile.imwrite(tmp_path / "zc.tif", hyperstack, imagej=True, metadata={"axes": "ZCYX", "spacing": 2.0})
    tifffile.imwrite(tmp_path / "plain.tif", hyperstack)  # no metadata: the user says what the axes are
    tifffile.imwrite(tmp_path / "z.tif", volume, photometric="minisblack")
    assert _segment([tmp_path / "zc.tif"], tmp_path / "a", model_dir) == 0
    assert _segment([tmp_path / "plain.tif"], tmp_path / "b", model_dir, "--axes", "ZCYX", "--voxel-size", "2,1,1") == 0
    assert _segment([tmp_path / "z.tif"], tmp_path / "c", model_dir, "--axes", "ZYX", "--voxel-size", "2,1,1") == 0
    capsys.readouterr()
    labels = read_image(tmp_path / "a" / "zc.tif")
    assert labels.shape == volume.shape
    assert np.array_equal(labels, read_image(tmp_path / "b" / "plain.tif"))
    assert np.array_equal(labels, read_image(tmp_path / "c" / "z.tif"))


def test_a_grey_png_with_alpha_is_segmented_as_its_grey(tmp_path, model_dir, capsys):
    nuclei, _ = _nuclei_and_cytoplasm()
    grey = (nuclei / nuclei.max() * 255).astype(np.uint8)
    iio.imwrite(tmp_path / "alpha.png", np.dstack([grey, np.full(grey.shape, 255, np.uint8)]))
    iio.imwrite(tmp_path / "grey.png", grey)
    assert _segment([tmp_path / "alpha.png", tmp_path / "grey.png"], tmp_path / "out", model_dir) == 0
    assert "alpha.png: channel 0 of 2" in capsys.readouterr().err
    labels = read_image(tmp_path / "out" / "alpha.tif")
    assert labels.shape == grey.shape and np.array_equal(labels, read_image(tmp_path / "out" / "grey.tif"))


def test_a_channel_asked_of_an_image_without_channels_is_an_error(tmp_path, model_dir, capsys):
    nuclei, _ = _nuclei_and_cytoplasm()
    tifffile.imwrite(tmp_path / "one.tif", nuclei)
    assert _segment([tmp_path / "one.tif"], tmp_path / "out", model_dir, "--channel", "1") == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith("one.tif: --channel 1 given, but the image has no channel axis")
    )


def test_training_reads_the_nuclear_channel_as_segmentation_does(tmp_path):
    """``nuclei-unet train`` on confocal files with channels: it said 'labels shape (96, 128) does not match image
    shape (2, 96)'."""
    from napari_nuclei_unet.data import load_pairs

    nuclei, cytoplasm = _nuclei_and_cytoplasm()
    _, labels = nuclei_field((96, 128), count=8, seed=3)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    tifffile.imwrite(
        tmp_path / "images" / "a.tif", np.stack([cytoplasm, nuclei]), imagej=True, metadata={"axes": "CYX"}
    )
    tifffile.imwrite(tmp_path / "labels" / "a.tif", labels.astype(np.uint16))
    (pair,) = load_pairs(tmp_path / "images", tmp_path / "labels")
    assert np.array_equal(pair.image, nuclei) and pair.labels.shape == nuclei.shape


def test_a_channel_number_picks_one_colour_of_an_rgb_composite(tmp_path, model_dir, capsys):
    """DAPI in the blue of an RGB composite: --channel 2 segments it alone (auto reads the colour image)."""
    nuclei, cytoplasm = _nuclei_and_cytoplasm()

    def to8(array):
        return (array / array.max() * 255).astype(np.uint8)

    iio.imwrite(tmp_path / "composite.png", np.dstack([to8(cytoplasm), np.zeros_like(to8(nuclei)), to8(nuclei)]))
    iio.imwrite(tmp_path / "blue.png", to8(nuclei))
    assert _segment([tmp_path / "composite.png"], tmp_path / "a", model_dir, "--channel", "2") == 0
    assert _segment([tmp_path / "blue.png"], tmp_path / "b", model_dir) == 0
    assert "composite.png: channel 2 of 3" in capsys.readouterr().err
    assert np.array_equal(read_image(tmp_path / "a" / "composite.tif"), read_image(tmp_path / "b" / "blue.tif"))


def test_a_few_planes_of_different_stains_are_read_as_channels_as_the_widget_reads_them(
    tmp_path, model_dir, capsys, caplog
):
    """A (2, Y, X) TIFF that does not say its axes: the widget guessed channels from how the planes look, the CLI
    labelled both planes. Both read it as channels now, and say so; --axes TYX keeps the planes."""
    nuclei, _ = _nuclei_and_cytoplasm()
    cytoplasm = np.full(nuclei.shape, 3000, np.uint16)
    cytoplasm[:, : nuclei.shape[1] * 7 // 10] += 1500  # a stain over most of the field
    tifffile.imwrite(tmp_path / "unstated.tif", np.stack([cytoplasm, nuclei]))
    tifffile.imwrite(tmp_path / "nuclei.tif", nuclei)
    assert _segment([tmp_path / "unstated.tif", tmp_path / "nuclei.tif"], tmp_path / "a", model_dir) == 0
    assert "unstated.tif: channel 1 of 2" in capsys.readouterr().err
    assert "unstated.tif: 2 planes that look like different stains, and the file does not say" in caplog.text
    assert np.array_equal(read_image(tmp_path / "a" / "unstated.tif"), read_image(tmp_path / "a" / "nuclei.tif"))
    assert _segment([tmp_path / "unstated.tif"], tmp_path / "b", model_dir, "--axes", "TYX") == 0
    assert read_image(tmp_path / "b" / "unstated.tif").shape == (2, *nuclei.shape)
    look_alike = np.stack([nuclei, np.roll(nuclei, 9, axis=1)])  # two planes of one stain: a stack, as before
    assert channel_axis(look_alike, "") is None
