from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage as ndi

from conftest import disks
from napari_nuclei_unet.postprocess import (
    MAX_UNSURE_SHARE,
    PostprocessParams,
    auto_threshold,
    distance_markers,
    instances,
    semantic_mask,
    unsure_objects,
    with_threshold,
)

RESOLVED = PostprocessParams(threshold=0.5, min_confidence=0.0, markers="distance", marker_threshold=0.5)


def test_two_touching_disks_split_by_distance_watershed():
    labels = disks()
    probability = np.where(labels > 0, 0.95, 0.02).astype(np.float32)[None]
    mask, found = instances(probability, ("foreground",), RESOLVED)
    assert found.max() == 2
    for true_label in (1, 2):
        values, counts = np.unique(found[labels == true_label], return_counts=True)
        assert counts.max() / counts.sum() > 0.95  # each disk is essentially one instance


def test_boundary_markers_split_packed_nuclei_even_through_gaps_in_the_boundary():
    """Nuclei packed with no gap (dense tissue): the mask's distance transform has one ridge, but cutting the mask
    along the predicted boundaries gives one seed per nucleus, also where the boundary has a hole."""
    from skimage.segmentation import find_boundaries

    truth = np.zeros((80, 220), np.int32)
    for index in range(8):  # eight 25 x 60 nuclei side by side, touching along their long sides
        truth[10:70, 10 + index * 25 : 10 + (index + 1) * 25] = index + 1
    boundary = find_boundaries(truth, mode="inner").astype(np.float32)
    boundary[38:43, :] = 0  # the network missed part of every border
    probabilities = np.stack([(truth > 0).astype(np.float32), boundary])
    outputs = ("foreground", "boundary")
    params = replace(RESOLVED, min_size=10)
    merged = instances(probabilities, outputs, params)[1]
    split = instances(probabilities, outputs, replace(params, markers="boundary", marker_threshold=0.7))[1]
    assert merged.max() < 8 and split.max() == 8
    for index in range(1, 9):  # each nucleus one object, and nearly all of it
        values, counts = np.unique(split[truth == index], return_counts=True)
        assert counts.max() / counts.sum() > 0.9
    with pytest.raises(ValueError, match="boundary markers need a model with a 'boundary' output"):
        instances(probabilities[:1], outputs[:1], replace(params, markers="boundary"))


def test_auto_markers_are_the_models_choice_and_levels_the_methods():
    from napari_nuclei_unet.postprocess import MARKER_THRESHOLDS, resolve_markers

    outputs = ("foreground", "boundary")
    chosen = resolve_markers(PostprocessParams(), "boundary", outputs)
    assert (chosen.markers, chosen.marker_threshold) == ("boundary", MARKER_THRESHOLDS["boundary"])
    given = resolve_markers(PostprocessParams(markers="distance", marker_threshold=0.3), "boundary", outputs)
    assert (given.markers, given.marker_threshold) == ("distance", 0.3)  # the user's choice wins
    with pytest.raises(ValueError, match="centre markers need a model with a 'centre' output"):
        resolve_markers(PostprocessParams(markers="centre"), "distance", outputs)
    with pytest.raises(ValueError, match="marker threshold"):
        resolve_markers(PostprocessParams(marker_threshold=1.5), "boundary", outputs)


def test_min_size_holes_and_sequential_labels():
    probability = np.zeros((60, 60), np.float32)
    probability[5:25, 5:25] = 0.9
    probability[12:15, 12:15] = 0.1  # a 9-pixel hole
    probability[40:42, 40:42] = 0.9  # a 4-pixel speck
    probability[30:50, 5:20] = 0.9
    mask, labels = instances(
        probability[None],
        ("foreground",),
        replace(RESOLVED, min_size=10, hole_size=20, min_confidence=0.0),
    )
    assert mask[13, 13]  # hole filled
    assert labels[41, 41] == 0  # speck removed
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]


def test_kept_labels_are_renumbered_in_order_as_relabel_sequential_does():
    from skimage.segmentation import relabel_sequential

    from napari_nuclei_unet.postprocess import keep_renumbered

    labels = np.random.default_rng(2).integers(0, 40, (50, 60)).astype(np.int32)
    labels[labels == 7] = 0  # a label in the table that no pixel has
    keep = (np.random.default_rng(3).random(40) < 0.6) & (np.bincount(labels.ravel(), minlength=40) > 0)
    expected = np.where(keep[labels], labels, 0).astype(np.int32)
    expected = relabel_sequential(expected)[0]
    got = keep_renumbered(labels, keep)
    assert got.dtype == np.int32 and np.array_equal(got, expected)
    assert keep_renumbered(labels, np.bincount(labels.ravel()) > 0).max() == len(np.unique(labels)) - 1


def _markers_by_h_maxima(distance, mask, h, smoothing):
    """The markers as they were found before: the peak pixels of objects with one local-maximum region, and
    ``h_maxima`` on the box of each object with several, alone; numbered object by object."""
    from skimage.morphology import h_maxima

    smooth = ndi.gaussian_filter(distance, smoothing)
    objects, count = ndi.label(mask)
    maxima = ndi.label((smooth == ndi.maximum_filter(smooth, size=3)) & mask)[0]
    markers = np.zeros(mask.shape, np.int32)
    next_label = 0
    single = []
    for label, box in enumerate(ndi.find_objects(objects), start=1):
        inside = objects[box] == label
        values = np.where(inside, smooth[box], 0.0).astype(np.float32)
        if np.unique(maxima[box][inside & (maxima[box] > 0)]).size < 2 or values.max() <= h:
            single.append((box, inside & (values == values.max())))
    for box, top in single:  # labelled first, in raster order over the image
        markers[box][top] = -1
    markers, next_label = ndi.label(markers == -1)
    for label, box in enumerate(ndi.find_objects(objects), start=1):
        inside = objects[box] == label
        values = np.where(inside, smooth[box], 0.0).astype(np.float32)
        if np.unique(maxima[box][inside & (maxima[box] > 0)]).size >= 2 and values.max() > h:
            found, found_count = ndi.label(h_maxima(values, h).astype(bool) & inside)
            markers[box][found > 0] = found[found > 0] + next_label
            next_label += found_count
    return markers.astype(np.int32)


@pytest.mark.parametrize("seed", range(7))
def test_markers_are_the_h_maxima_of_each_object_alone(seed):
    """Distance markers from the maxima's dynamics are exactly per-object ``h_maxima`` (2D and 3D, dense fields of
    irregular clusters, pixels whose distance ties), numbered the same way. Seed 6's field has a pixel next to a
    kept maximum and below it by less than float32's resolution, which ``h_maxima`` counts in."""
    rng = np.random.default_rng(0 if seed == 6 else seed)
    shape, sigma, sampling = ((160, 200), 3 + seed % 3, None) if seed < 3 else ((24, 64, 80), (1.5, 3, 3), (2, 1, 1))
    if seed == 6:
        rng.random((300, 300))
        shape, sigma, sampling = (300, 300), 4, None
    field = ndi.gaussian_filter(rng.random(shape), sigma)
    mask = field > np.percentile(field, 40 if seed == 6 else 35 + 5 * seed)
    distance = ndi.distance_transform_edt(mask, sampling=sampling).astype(np.float32)
    smoothing = 1.0 if sampling is None else (0.5, 1.0, 1.0)
    for h in (0.5, 1.5):
        markers = distance_markers(distance, mask, h, smoothing)
        expected = _markers_by_h_maxima(distance, mask, h, smoothing)
        assert markers.max() > 20 and np.array_equal(markers, expected)


@pytest.mark.parametrize("seed", [0, 2, 4, 10])
def test_markers_of_objects_that_touch_at_a_corner_are_their_own(seed):
    """A flood of the maxima through diagonal neighbours crossed into another object touching at a corner and took
    its maximum away (an E2F section: one nucleus of 240 lost its marker); pitted masks have many such corners."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.random((160, 200)), 2.0)
    mask = (field > np.percentile(field, 50)) & (rng.random(field.shape) > 0.15)
    distance = ndi.distance_transform_edt(mask).astype(np.float32)
    expected = _markers_by_h_maxima(distance, mask, 0.5, 1.0)
    assert expected.max() > 100 and np.array_equal(distance_markers(distance, mask, 0.5, 1.0), expected)


def test_blank_image_gives_no_nuclei():
    blank = np.full((1, 50, 50), 0.01, np.float32)
    mask, labels = instances(blank, ("foreground",), with_threshold(replace(RESOLVED, threshold="auto"), blank[0]))
    assert not mask.any() and labels.max() == 0
    noise = np.random.default_rng(0).random((50, 50)).astype(np.float32) * 0.2
    assert semantic_mask(noise, auto_threshold(noise)).sum() == 0  # auto threshold does not split pure background


def test_auto_threshold_and_validation():
    probability = np.concatenate([np.full(100, 0.1), np.full(100, 0.8)]).astype(np.float32).reshape(10, 20)
    assert 0.3 <= auto_threshold(probability) <= 0.7
    with pytest.raises(ValueError, match="threshold"):
        with_threshold(PostprocessParams(threshold=1.5), probability)


def test_postprocessing_refuses_an_unresolved_auto():
    """'auto' must be made a number before post-processing (segment.resolve, with_threshold): never a silent default."""
    probability = np.full((1, 20, 20), 0.9, np.float32)
    with pytest.raises(ValueError, match="threshold 'auto' reached post-processing unresolved"):
        instances(probability, ("foreground",), replace(RESOLVED, threshold="auto"))
    with pytest.raises(ValueError, match="min_confidence 'auto' reached post-processing unresolved"):
        instances(probability, ("foreground",), replace(RESOLVED, min_confidence="auto"))
    with pytest.raises(ValueError, match="markers 'auto' reached post-processing unresolved"):
        instances(probability, ("foreground",), replace(RESOLVED, markers="auto"))


def test_the_min_confidence_drops_at_most_its_share_of_an_image_the_least_sure_first():
    """An image the model is unsure of almost everywhere (an unfamiliar stain): the calibrated level would keep 2
    of 10 nuclei; it drops the least sure 40% (MAX_UNSURE_SHARE) and reports them."""
    probability = np.full((40, 420), 0.02, np.float32)
    levels = [0.95, 0.95, 0.52, 0.55, 0.6, 0.65, 0.7, 0.72, 0.74, 0.76]
    for index, level in enumerate(levels):
        probability[10:30, 10 + 40 * index : 30 + 40 * index] = level
    report = {}
    _mask, labels = instances(probability[None], ("foreground",), replace(RESOLVED, min_confidence=0.8), report=report)
    assert MAX_UNSURE_SHARE == 0.4 and report == {"unsure": 4} and labels.max() == 6
    kept = [labels[20, 20 + 40 * index] > 0 for index in range(len(levels))]
    assert kept == [True, True, False, False, False, False, True, True, True, True]  # 0.52-0.65 went
    # Uncapped (a Z-stack's 3D labelling): every object below the level goes.
    with_all, _count = ndi.label(probability > 0.5)
    sizes = np.bincount(with_all.ravel())
    unsure = unsure_objects(with_all, probability, sizes, sizes < 1, 0.8, max_share=1.0)
    assert unsure.sum() == 8 and not unsure[0]


def test_objects_the_network_is_unsure_of_are_dropped():
    probability = np.full((60, 150), 0.02, np.float32)
    probability[5:25, 5:25] = 0.95  # a nucleus
    probability[5:25, 40:60] = 0.6  # a fold: above the threshold, but the network is unsure of it
    probability[35:55, 40:60] = 0.88
    probability[5:25, 90:110] = probability[35:55, 90:110] = probability[35:55, 5:25] = 0.97  # more sure nuclei
    params = replace(RESOLVED, min_confidence=0.0)
    assert instances(probability[None], ("foreground",), params)[1].max() == 6  # 0: no filter
    mask, labels = instances(probability[None], ("foreground",), replace(RESOLVED, min_confidence=0.85))
    assert labels.max() == 5 and labels[15, 50] == 0 and not mask[15, 50]  # mask and labels agree
    assert labels[15, 15] == 1 and labels[45, 50] == 4  # numbered 1..N again
    assert instances(probability[None], ("foreground",), replace(RESOLVED, min_confidence=0.9))[1].max() == 4
    report = {}  # how many went for being unsure alone: what the widget warns about
    instances(probability[None], ("foreground",), replace(RESOLVED, min_confidence=0.9), report=report)
    assert report == {"unsure": 2}  # the 0.6 and the 0.88 objects
    instances(
        probability[None],
        ("foreground",),
        replace(RESOLVED, min_confidence=0.9, min_size=401),
        report=report,
    )
    assert report == {"unsure": 0}  # all six (400 px) too small: none went for being unsure alone
    instances(
        np.zeros((1, 10, 10), np.float32),
        ("foreground",),
        replace(RESOLVED, min_confidence=0.9),
        report=report,
    )
    assert report == {"unsure": 0}
    with pytest.raises(ValueError, match="min_confidence"):
        instances(probability[None], ("foreground",), replace(RESOLVED, min_confidence=1.0))
    with pytest.raises(ValueError, match="min_confidence"):
        instances(probability[None], ("foreground",), replace(RESOLVED, min_confidence="high"))


def test_centre_markers_separate_dense_nuclei_the_distance_transform_merges():
    """Nuclei packed with no gap between them (dense tissue): the mask is one blob whose distance transform has
    one peak per row, but a model's centre output (1 at each nucleus's centre) gives one seed per nucleus."""
    from napari_nuclei_unet.training.targets import centre_target

    truth = np.zeros((60, 200), np.int32)
    for index in range(8):  # eight 25 x 60 nuclei side by side, touching along their long sides
        truth[:, index * 25 : (index + 1) * 25] = index + 1
    centre = centre_target(truth).astype(np.float32) / 255
    assert all(centre[truth == index].max() == 1.0 for index in range(1, 9))  # 1 at each centre, whatever its size
    assert centre[:, 24].max() == centre[:, 25].max() == 0  # 0 where two nuclei touch
    probabilities = np.stack([(truth > 0).astype(np.float32), np.zeros(truth.shape, np.float32), centre])
    outputs = ("foreground", "boundary", "centre")
    params = replace(RESOLVED, min_confidence=0.0, min_size=10, markers="distance")
    _mask, merged = instances(probabilities, outputs, params)
    _mask, split = instances(probabilities, outputs, replace(params, markers="centre"))
    assert merged.max() < 8 and split.max() == 8
    assert all(np.unique(split[truth == index]).size == 1 for index in range(1, 9))
    with pytest.raises(ValueError, match="centre markers need a model with a 'centre' output"):
        instances(probabilities[:2], outputs[:2], replace(params, markers="centre"))


def test_the_classical_baseline_segments_a_generated_field():
    """The Otsu + watershed baseline every benchmark prints beside the models."""
    from napari_nuclei_unet.baseline import classical_segment
    from napari_nuclei_unet.metrics import evaluate
    from napari_nuclei_unet.synthetic import nuclei_field

    image, truth = nuclei_field((200, 240), count=20, diameter=20, seed=3)
    assert evaluate([(truth, classical_segment(image))]).ap50 > 0.5
