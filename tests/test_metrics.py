import numpy as np
import pytest

from napari_nuclei_unet.metrics import evaluate, inside_region, iou_matrix, labelled_region, match_image


def test_iou_matrix_hand_computed():
    truth = np.array([[1, 1, 0, 0], [1, 1, 0, 2]])
    pred = np.array([[5, 5, 5, 0], [5, 5, 0, 0]])
    iou = iou_matrix(truth, pred)
    assert iou.shape == (2, 1)
    assert iou[0, 0] == pytest.approx(4 / 5) and iou[1, 0] == 0


def test_kaggle_score_hand_computed():
    # One nucleus of 10 px predicted with 8 px inside: IoU 0.8 -> hit at t = 0.50..0.75 (6 of 10 thresholds).
    truth = np.zeros((5, 5), int)
    truth[0:2, :] = 1
    pred = np.zeros((5, 5), int)
    pred[0:2, :4] = 3
    assert match_image(truth, pred).kaggle_score == pytest.approx(0.6)
    # plus one false positive: each hit threshold gives 1/2, misses give 0/2.
    pred[4, 4] = 9
    assert match_image(truth, pred).kaggle_score == pytest.approx(0.3)


def test_set_metrics_hand_computed():
    perfect = np.zeros((6, 6), int)
    perfect[0:2, 0:2] = 1
    perfect[3:5, 3:5] = 2
    missed_one = perfect.copy()
    missed_one[missed_one == 2] = 0
    scores = evaluate([(perfect, perfect), (perfect, missed_one)])
    # TP=3, FP=0, FN=1 at 0.5
    assert scores.ap50 == pytest.approx(3 / 4)
    assert scores.precision50 == 1 and scores.recall50 == pytest.approx(3 / 4)
    assert scores.f1_50 == pytest.approx(6 / 7)
    assert scores.kaggle_score == pytest.approx((1 + 0.5) / 2)
    assert scores.dice == pytest.approx(2 * 12 / (16 + 12))
    assert scores.iou == pytest.approx(12 / 16)


def test_empty_cases():
    empty = np.zeros((4, 4), int)
    assert match_image(empty, empty).kaggle_score == 1.0
    one = empty.copy()
    one[1, 1] = 1
    assert match_image(one, empty).kaggle_score == 0.0
    assert match_image(empty, one).kaggle_score == 0.0


def test_a_partly_labelled_image_is_scored_inside_its_labelled_region():
    """e2f_intestine's test images label one crypt's nuclei; the nuclei around it are real but unlabelled, and
    finding them must not count as false positives."""
    truth = np.zeros((200, 300), np.int32)
    found = np.zeros_like(truth)
    index = 0
    for row in range(40, 160, 20):  # a labelled block of 6 x 5 nearly touching nuclei, found exactly
        for col in range(40, 140, 20):
            index += 1
            truth[row : row + 18, col : col + 18] = found[row : row + 18, col : col + 18] = index
    for row in range(40, 160, 20):  # unlabelled nuclei beside it, 60 px away, also found
        index += 1
        found[row : row + 18, 200:218] = index
    region = labelled_region(truth)
    assert region[40:158, 40:138].all()  # the labelled nuclei and the gaps between them
    assert not region[:, 180:].any()  # not the unlabelled ones
    assert match_image(truth, found).kaggle_score < 0.85  # the whole image: 6 false positives
    kept = inside_region(found, region)
    assert np.array_equal(kept, np.where(found <= 30, found, 0))
    assert match_image(truth, kept).kaggle_score == 1.0
    half_out = found.copy()
    half_out[100:118, 136:156] = 99  # an object lying mostly outside the labelled region goes
    assert 99 not in inside_region(half_out, region)
    assert not labelled_region(np.zeros((5, 5), np.int32)).any()
