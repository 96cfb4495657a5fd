"""The shared pipeline: rescaling to the model's nucleus size, stain choice, stacks."""

from __future__ import annotations

import numpy as np
import pytest

from napari_nuclei_unet.errors import InputError
from napari_nuclei_unet.scale import rescale_factor
from napari_nuclei_unet.segment import SegmentParams, segment, segment_planes
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
    params = SegmentParams(tiling=TilingParams(tile_size=4096), diameter=40.0)
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
