"""The shared pipeline: rescaling to the model's nucleus size, stain choice, stacks."""

from __future__ import annotations

import numpy as np
import pytest

from napari_nuclei_unet.errors import InputError
from napari_nuclei_unet.scale import rescale_factor
from napari_nuclei_unet.segment import AUTO, SegmentParams, segment, segment_planes
from napari_nuclei_unet.tiling import TilingParams


def test_rescale_factor(tiny_checkpoint):
    tiny_checkpoint.nucleus_diameter = 20.0
    assert rescale_factor(tiny_checkpoint, None) == 1.0
    assert rescale_factor(tiny_checkpoint, 21.0) == 1.0  # within the band the model handles as is
    assert rescale_factor(tiny_checkpoint, 30.0) == 1.0
    assert rescale_factor(tiny_checkpoint, 40.0) == pytest.approx(0.8)  # to the band's top, 1.6 x 20 px
    assert rescale_factor(tiny_checkpoint, 17.0) == 1.0  # the band's bottom is 0.7 x 20 px
    assert rescale_factor(tiny_checkpoint, 8.0) == pytest.approx(2.5)  # small nuclei: to the training size
    with pytest.raises(InputError, match="positive"):
        rescale_factor(tiny_checkpoint, -3)
    tiny_checkpoint.nucleus_diameter = None
    with pytest.raises(InputError, match="does not record"):
        rescale_factor(tiny_checkpoint, 40.0)


def test_diameter_runs_the_network_on_a_rescaled_image_and_maps_back(tiny_checkpoint):
    tiny_checkpoint.nucleus_diameter = 20.0
    image = np.random.default_rng(0).random((150, 110)).astype(np.float32)
    seen = []
    model = tiny_checkpoint.model
    original_forward = model.forward

    def spy(batch):
        seen.append(tuple(batch.shape[-2:]))
        return original_forward(batch)

    model.forward = spy
    params = SegmentParams(
        tiling=TilingParams(tile_size=4096, backend="torch"), diameter=40.0
    )  # the spy sees torch's calls
    probabilities = _probabilities(tiny_checkpoint, image, params)
    assert probabilities.shape == (2, 150, 110)
    assert seen and seen[0][0] < 150  # the network saw the half-size image (padded to a multiple of 32)
    result = segment(tiny_checkpoint, np.stack([image, image]), params)
    assert result.labels.shape == (2, 150, 110) and result.probabilities.shape == (2, 2, 150, 110)


def test_hematoxylin_stain_needs_rgb(tiny_checkpoint):
    rgb = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    assert _probabilities(tiny_checkpoint, rgb, SegmentParams(stain="hematoxylin")).shape == (2, 64, 64)
    with pytest.raises(InputError, match="RGB"):
        _probabilities(tiny_checkpoint, rgb[..., 0], SegmentParams(stain="hematoxylin"))
    with pytest.raises(InputError, match="stain"):
        _probabilities(tiny_checkpoint, rgb, SegmentParams(stain="eosin"))


def test_network_key_ignores_postprocessing():
    from napari_nuclei_unet.postprocess import PostprocessParams

    a = SegmentParams(postprocess=PostprocessParams(min_size=3))
    b = SegmentParams(postprocess=PostprocessParams(min_size=300, h=4.0))
    assert a.network_key() == b.network_key()
    assert a.network_key() != SegmentParams(diameter=30.0).network_key()
    assert a.network_key() != SegmentParams(stain="hematoxylin").network_key()


def _probabilities(checkpoint, image, params):
    return segment_planes(checkpoint, image, params).probabilities


def _purple_tissue(seed=2):
    """An H&E-like RGB field: purple discs on pink."""
    from napari_nuclei_unet.synthetic import nuclei_field

    field, _ = nuclei_field((96, 96), count=8, diameter=14, seed=seed)
    signal = field.astype(np.float32) / max(float(field.max()), 1.0)
    pink, purple = np.array([235, 190, 215]), np.array([90, 40, 150])
    return (pink + (purple - pink) * signal[..., None]).astype(np.uint8)


def test_auto_stain_follows_the_detected_image_type_and_the_model(tiny_checkpoint):
    from napari_nuclei_unet.segment import resolve

    tissue = _purple_tissue()
    params = resolve(tiny_checkpoint, tissue, SegmentParams(diameter=None)).params
    assert (params.image_type, params.stain) == ("tissue", "hematoxylin")  # a model that records nothing: v1's choice
    tiny_checkpoint.metadata["stain_by_image_type"] = {"tissue": "none"}
    params = resolve(tiny_checkpoint, tissue, SegmentParams(diameter=None)).params
    assert (params.image_type, params.stain) == ("tissue", "none")  # what this model reads best
    grey = tissue.mean(-1).astype(np.uint8)
    assert resolve(tiny_checkpoint, grey, SegmentParams(diameter=None)).params.image_type == "brightfield"
    assert resolve(tiny_checkpoint, 255 - grey, SegmentParams(diameter=None)).params.image_type == "fluorescence"
    forced = resolve(tiny_checkpoint, grey, SegmentParams(diameter=None, image_type="tissue")).params
    assert (forced.image_type, forced.stain) == ("tissue", "none")  # a grey image has no hematoxylin channel
    explicit = resolve(tiny_checkpoint, tissue, SegmentParams(diameter=None, stain="hematoxylin")).params
    assert explicit.stain == "hematoxylin"
    record = segment_planes(tiny_checkpoint, tissue, SegmentParams(diameter=None)).record()
    assert (record["image_type"], record["stain"]) == ("tissue", "none")
    with pytest.raises(InputError, match="image type"):
        resolve(tiny_checkpoint, tissue, SegmentParams(image_type="histology"))


def test_auto_stain_reads_the_channel_it_chose(tiny_checkpoint):
    """The network sees the hematoxylin channel exactly when "auto" chose it."""
    tissue = _purple_tissue()
    auto = _probabilities(tiny_checkpoint, tissue, SegmentParams(diameter=None))
    assert np.array_equal(
        auto, _probabilities(tiny_checkpoint, tissue, SegmentParams(diameter=None, stain="hematoxylin"))
    )
    assert not np.array_equal(auto, _probabilities(tiny_checkpoint, tissue, SegmentParams(diameter=None, stain="none")))


@pytest.mark.parametrize("tint", [(0, 0, 1), (0, 1, 0), (1, 0, 1), (0.3, 0.6, 1.0)])
def test_pseudo_coloured_fluorescence_is_read_as_its_grey(tiny_checkpoint, tint):
    """Hoechst saved blue on black was read as stained tissue (DSB2018 val fluorescence tinted blue: 0.382
    against 0.678 grey); its brightest channel is the grey image it was rendered from."""
    from napari_nuclei_unet.segment import resolve
    from napari_nuclei_unet.synthetic import nuclei_field

    field, _ = nuclei_field((96, 96), count=8, diameter=14, seed=3)
    grey = (255 * field.astype(np.float32) / float(field.max())).astype(np.uint8)
    tinted = (grey[..., None] * np.array(tint, np.float32)).astype(np.uint8)
    params = resolve(tiny_checkpoint, tinted, SegmentParams(diameter=None)).params
    assert (params.image_type, params.stain) == ("fluorescence", "brightest")
    auto = _probabilities(tiny_checkpoint, tinted, SegmentParams(diameter=None))
    assert np.array_equal(auto, _probabilities(tiny_checkpoint, grey, SegmentParams(diameter=None)))
    as_is = _probabilities(tiny_checkpoint, tinted, SegmentParams(diameter=None, stain="none"))
    assert not np.array_equal(auto, as_is)
    assert resolve(tiny_checkpoint, _purple_tissue(), SegmentParams(diameter=None)).params.image_type == "tissue"


def test_dense_fluorescence_is_not_called_brightfield():
    """Nuclei filling three quarters of the field put the median above the mean, as a bright background does
    (22 of the 57 E2F train and val sections were called brightfield); its median is mid-range, not near the top."""
    from napari_nuclei_unet.data import image_type
    from napari_nuclei_unet.synthetic import nuclei_field

    dense, labels = nuclei_field((256, 256), count=260, diameter=18, seed=1)
    assert (labels > 0).mean() > 0.7
    assert image_type(dense) == "fluorescence"
    sparse, _ = nuclei_field((256, 256), count=30, diameter=18, seed=1)
    assert image_type(sparse.max() - sparse) == "brightfield"  # dark nuclei on a bright background


def test_a_lazy_colour_plane_is_converted_only_where_it_is_read():
    """A large pseudo-coloured zarr or dask plane must not be read whole to take its brightest channel."""
    from napari_nuclei_unet.plane import apply_stain

    rgb = np.random.default_rng(5).integers(0, 255, (300, 200, 3), dtype=np.uint8)
    reads = []

    class Lazy:  # a zarr-like array: slicing reads, nothing else does
        shape, ndim, dtype = rgb.shape, 3, rgb.dtype

        def __getitem__(self, key):
            reads.append(rgb[key].shape[:2])
            return rgb[key]

    for stain, convert in (("brightest", lambda a: a.max(-1)), ("hematoxylin", None)):
        seen = apply_stain(Lazy(), stain)
        assert seen.shape == (300, 200) and seen.ndim == 2 and reads == []
        crop = seen[40:90, 10:30]
        expected = convert(rgb[40:90, 10:30]) if convert else apply_stain(rgb[40:90, 10:30], stain)
        assert np.array_equal(crop, expected) and reads == [(50, 20)]
        reads.clear()
    assert np.array_equal(np.asarray(apply_stain(Lazy(), "brightest")), rgb.max(-1))
    assert np.array_equal(apply_stain(rgb, "brightest"), rgb.max(-1))  # numpy: converted at once
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    assert np.array_equal(apply_stain(rgba, "brightest"), rgb.max(-1))  # the alpha channel is no colour
    grey = Lazy()
    grey.shape, grey.ndim = rgb.shape[:2], 2
    reads.clear()
    assert apply_stain(grey, "brightest") is grey and reads == []  # a grey plane is not read at all


@pytest.mark.parametrize("kind", ["plane", "large plane", "stack", "z-stack"])
def test_progress_runs_once_from_zero_to_the_end_over_the_estimate_tiles_and_labelling(kind, monkeypatch):
    """The bar ran 9/9 (the size estimate), then restarted at 1/4 and 1/16, and was full before labelling."""
    from napari_nuclei_unet.model import Checkpoint, bundled_model_path
    from napari_nuclei_unet.params import BlockParams, TilingParams
    from napari_nuclei_unet.segment import PROGRESS_STEPS, segment_planes
    from napari_nuclei_unet.synthetic import nuclei_field

    image, _ = nuclei_field((320, 384), count=30, diameter=18, seed=11)
    if kind in ("stack", "z-stack"):
        image = np.stack([image, image[::-1], image[:, ::-1]])
    blocks = BlockParams(block_size=256, large_plane=100 * 100) if kind == "large plane" else BlockParams()
    seen = []
    from napari_nuclei_unet import plane, segment

    labelling = {"label_plane": plane.label_plane, "volume_instances": segment.volume_instances}
    for name, original in labelling.items():  # what the bar showed when the labelling began
        monkeypatch.setattr(
            segment, name, lambda *a, _o=original, **k: seen.append(("labelling", seen[-1][0])) or _o(*a, **k)
        )
    segment_planes(
        Checkpoint.load(bundled_model_path()),
        image,
        SegmentParams(
            tiling=TilingParams(tile_size=128, overlap=32), blocks=blocks, stack="z" if kind == "z-stack" else AUTO
        ),
        progress=lambda done, total: seen.append((done, total)),
    )
    started_labelling = [at for what, at in seen if what == "labelling"]
    seen = [entry for entry in seen if entry[0] != "labelling"]
    assert all(at < PROGRESS_STEPS for at in started_labelling)  # not full before the labelling is done
    assert {total for _, total in seen} == {PROGRESS_STEPS}
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == PROGRESS_STEPS  # never back, and full only at the end
    assert any(0 < d < 0.25 * PROGRESS_STEPS for d in done)  # the size estimate's passes have their share
    assert len(set(done)) >= 5
