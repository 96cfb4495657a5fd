import numpy as np
import pytest

from napari_nuclei_unet import Cancelled
from napari_nuclei_unet.io import Normalizer
from napari_nuclei_unet.tiling import TilingParams, axis_tiles, plan_tiles, predict


@pytest.mark.parametrize("length", [1, 31, 256, 520, 1025, 1388, 5000])
@pytest.mark.parametrize("tile, overlap", [(256, 32), (512, 64), (1024, 64)])
def test_tiles_cover_axis_with_overlap(length, tile, overlap):
    size, starts = axis_tiles(length, tile, overlap)
    assert size % 32 == 0 and size <= max(tile, 32)
    assert starts[0] == 0 and starts[-1] + size >= length
    for a, b in zip(starts, starts[1:]):
        assert a + size - b >= overlap  # neighbours share at least the overlap


def test_blend_weights_sum_to_one():
    shape = (1100, 700)
    _, tiles = plan_tiles(shape, 256, 48)
    total = np.zeros(shape)
    for tile in tiles:
        total[tile.y : tile.y + tile.height, tile.x : tile.x + tile.width] += (
            tile.weight_y[:, None] * tile.weight_x[None, :]
        )
    assert np.allclose(total, 1.0, atol=1e-5)


def _smooth_image(shape, seed=0):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    return (ndi.gaussian_filter(rng.random(shape), 4) * 1000).astype(np.float32)


def test_tiled_matches_untiled(tiny_checkpoint):
    """No seams: tiled inference agrees with whole-image inference.

    The image is a multiple of 32 so both runs see the same borders; what remains is the
    tiles' missing context, which the overlap and blending must hide. Stated tolerance for
    probabilities in [0, 1], 128 px tiles with 48 px overlap: mean |diff| < 0.002, max < 0.02.
    """
    image = _smooth_image((320, 448))
    normalizer = Normalizer.from_image(image, 3)
    whole = predict(tiny_checkpoint.model, image, normalizer, TilingParams(tile_size=1024, device="cpu"))
    tiled = predict(
        tiny_checkpoint.model, image, normalizer, TilingParams(tile_size=128, overlap=48, batch_size=3, device="cpu")
    )
    assert whole.shape == tiled.shape == (2, 320, 448)
    difference = np.abs(whole - tiled)
    assert difference.mean() < 0.002, difference.mean()
    assert difference.max() < 0.02, difference.max()
    # More overlap, less disagreement: the blend is doing the work.
    less_overlap = predict(
        tiny_checkpoint.model, image, normalizer, TilingParams(tile_size=128, overlap=16, device="cpu")
    )
    assert np.abs(whole - less_overlap).mean() > difference.mean()


def test_progress_and_cancel(tiny_checkpoint):
    image = _smooth_image((200, 200))
    normalizer = Normalizer.from_image(image, 3)
    calls = []
    predict(
        tiny_checkpoint.model,
        image,
        normalizer,
        TilingParams(tile_size=64, overlap=16, batch_size=2, device="cpu"),
        progress=lambda d, t: calls.append((d, t)),
    )
    total = calls[-1][1]
    assert total > 4 and calls[-1][0] == total and [c[0] for c in calls] == sorted(c[0] for c in calls)
    seen = []
    with pytest.raises(Cancelled):
        predict(
            tiny_checkpoint.model,
            image,
            normalizer,
            TilingParams(tile_size=64, overlap=16, device="cpu"),
            progress=lambda d, t: seen.append(d),
            cancel=lambda: len(seen) >= 2,
        )
    assert len(seen) == 2  # stopped between tiles, right after the cancel request


def test_tta_and_rgb_input(tiny_checkpoint):
    rgb = np.stack([_smooth_image((90, 70), s) for s in range(3)], axis=-1).astype(np.uint16)
    normalizer = Normalizer.from_image(rgb, 3)
    out = predict(tiny_checkpoint.model, rgb, normalizer, TilingParams(device="cpu", tta=True))
    assert out.shape == (2, 90, 70) and np.isfinite(out).all() and (0 <= out).all() and (out <= 1).all()


def test_memory_is_bounded_by_tile_batch(tiny_checkpoint):
    """Predicting into a memory-mapped output touches only one batch of tiles at a time."""
    import tracemalloc

    image = np.zeros((2048, 2048), np.uint8)
    normalizer = Normalizer(low=0.0, high=255.0, channels=3)
    out = np.zeros((2, *image.shape), np.float32)
    params = TilingParams(tile_size=256, overlap=32, device="cpu")
    predict(tiny_checkpoint.model, image[:64, :64], normalizer, params)  # export (and quantise) the network first
    tracemalloc.start()
    predict(tiny_checkpoint.model, image, normalizer, params, out=out)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    full_copy = 2048 * 2048 * 3 * 4  # one float32 RGB copy of the image
    assert peak < full_copy / 4, peak
