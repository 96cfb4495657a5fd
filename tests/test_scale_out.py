"""Out-of-core and distributed segmentation through the CLI: zarr in and out, dask LocalCluster."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
import torch

from napari_nuclei_unet.cli import main
from napari_nuclei_unet.io import find_images, read_image
from napari_nuclei_unet.metrics import evaluate
from napari_nuclei_unet.rle import decode_csv
from napari_nuclei_unet.synthetic import nuclei_field


def test_zarr_in_zarr_out(tmp_path, capsys, monkeypatch):
    import zarr

    image, truth = nuclei_field((320, 400), count=40, diameter=20, seed=31)
    store = zarr.open_array(
        str(tmp_path / "field.zarr"), mode="w", shape=image.shape, chunks=(128, 128), dtype=image.dtype
    )
    store[...] = image
    assert (
        main(
            [
                "segment",
                str(tmp_path / "field.zarr"),
                "--out",
                str(tmp_path / "out"),
                "--out-format",
                "zarr",
                "--diameter",
                "none",
                "--rle-csv",
                str(tmp_path / "out.csv"),
                "--large-plane",
                str(200 * 200),
                "--block-size",
                "160",
            ]
        )
        == 0
    )
    labels = np.asarray(zarr.open_array(str(tmp_path / "out" / "field.zarr"), mode="r")[...])
    assert labels.shape == image.shape and evaluate([(truth, labels)]).ap50 > 0.8
    assert not any(p.name.endswith(".part") for p in (tmp_path / "out").iterdir())
    decoded = decode_csv(tmp_path / "out.csv")["field"]
    assert np.array_equal(decoded > 0, labels > 0)
    assert "1 image(s)" in capsys.readouterr().out


def test_large_tiff_is_read_lazily_and_written_tile_by_tile(tmp_path, monkeypatch):
    """A TIFF plane above the block threshold never has to fit in memory, in or out."""
    import zarr

    from napari_nuclei_unet import batch
    from napari_nuclei_unet.model import Checkpoint, bundled_model_path
    from napari_nuclei_unet.params import BlockParams, SegmentParams

    blocks = BlockParams(block_size=160, large_plane=200 * 200)  # the block path on a small image
    image, truth = nuclei_field((330, 410), count=40, diameter=20, seed=32)
    tifffile.imwrite(tmp_path / "field.tif", image, tile=(128, 128))
    opened = batch.open_image(tmp_path / "field.tif", blocks)
    assert isinstance(opened, zarr.Array) and np.array_equal(opened[...], image)  # lazy, same pixels

    checkpoint = Checkpoint.load(bundled_model_path())
    params = SegmentParams(diameter=None, blocks=blocks)
    result = batch.segment_file(checkpoint, tmp_path / "field.tif", tmp_path / "tif", params)
    batch.segment_file(checkpoint, tmp_path / "field.tif", tmp_path / "zarr", params, out_format="zarr")
    with tifffile.TiffFile(tmp_path / "tif" / "field.tif") as tif:
        assert tif.pages[0].is_tiled  # streamed tile by tile (whole arrays are written in strips)
    written = tifffile.imread(tmp_path / "tif" / "field.tif")
    assert written.dtype == np.uint16 and written.max() == result.nuclei
    assert np.array_equal(written, zarr.open_array(str(tmp_path / "zarr" / "field.zarr"), mode="r")[...])
    assert evaluate([(truth, written)]).ap50 > 0.8
    assert [p.name for p in (tmp_path / "tif").iterdir()] == ["field.tif"]  # no scratch left behind


def test_a_whole_slide_pyramid_is_read_lazily_at_full_resolution(tmp_path):
    """A pyramidal OME-TIFF (what QuPath and slide scanners write) was read whole: a slide larger than memory was
    refused. Its full-resolution level is read block by block, and labelled as the same pixels saved flat."""
    import zarr

    from napari_nuclei_unet import batch
    from napari_nuclei_unet.model import Checkpoint, bundled_model_path
    from napari_nuclei_unet.params import BlockParams, SegmentParams

    image, truth = nuclei_field((330, 410), count=40, diameter=20, seed=33)
    with tifffile.TiffWriter(tmp_path / "slide.ome.tif") as tif:
        tif.write(image, subifds=1, tile=(128, 128), metadata={"axes": "YX"})
        tif.write(image[::2, ::2], subfiletype=1, tile=(128, 128))
    tifffile.imwrite(tmp_path / "flat.tif", image)
    blocks = BlockParams(block_size=160, large_plane=200 * 200)
    opened = batch.open_image(tmp_path / "slide.ome.tif", blocks)
    assert isinstance(opened, zarr.Array) and np.array_equal(opened[...], image)
    checkpoint = Checkpoint.load(bundled_model_path())
    params = SegmentParams(diameter=None, blocks=blocks)
    batch.segment_file(checkpoint, tmp_path / "slide.ome.tif", tmp_path / "out", params)
    batch.segment_file(checkpoint, tmp_path / "flat.tif", tmp_path / "out", params)
    slide, flat = (tifffile.imread(tmp_path / "out" / name) for name in ("slide.ome.tif", "flat.tif"))
    assert np.array_equal(slide, flat) and evaluate([(truth, slide)]).ap50 > 0.8
    (tmp_path / "slide.ome.tif").rename(tmp_path / "scanner.svs")  # Aperio's name for the same kind of file
    assert find_images([str(tmp_path)]) == [(tmp_path / name).resolve() for name in ("flat.tif", "scanner.svs")]
    batch.segment_file(checkpoint, tmp_path / "scanner.svs", tmp_path / "out", params)
    assert np.array_equal(tifffile.imread(tmp_path / "out" / "scanner.tif"), flat)


def test_bad_zarr_is_one_line(tmp_path, capsys):
    (tmp_path / "broken.zarr").mkdir()
    assert main(["segment", str(tmp_path / "broken.zarr"), "--out", str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "broken.zarr" in errors[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_local_cluster_gives_exactly_the_serial_labels(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(4):
        image, _ = nuclei_field((200, 260), count=15, diameter=18 + 6 * seed, seed=40 + seed)
        tifffile.imwrite(folder / f"plate_{seed}.tif", image)
    threads = max(1, (os.cpu_count() or 1) // 2)  # what each of the 2 workers uses
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert main(["segment", str(folder), "--out", str(tmp_path / "serial")]) == 0
    finally:
        torch.set_num_threads(previous)
    assert main(["segment", str(folder), "--out", str(tmp_path / "cluster"), "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "dask: 2 worker(s)" in captured.err
    for seed in range(4):
        serial = read_image(tmp_path / "serial" / f"plate_{seed}.tif")
        assert serial.max() > 5
        assert np.array_equal(serial, read_image(tmp_path / "cluster" / f"plate_{seed}.tif"))


def test_an_unknown_extra_output_is_refused_before_any_work(tmp_path, tiny_checkpoint):
    """Checked once, before the image is read or segmented, for single images and time-lapses alike."""
    from napari_nuclei_unet import batch
    from napari_nuclei_unet.errors import InputError

    tifffile.imwrite(tmp_path / "field.tif", nuclei_field((64, 64), count=3, diameter=12, seed=1)[0])
    with pytest.raises(InputError, match="field.tif: .*unknown extra outputs \\['outlines'\\]"):
        batch.segment_file(tiny_checkpoint, tmp_path / "field.tif", tmp_path / "out", extras=("outlines",))
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder
