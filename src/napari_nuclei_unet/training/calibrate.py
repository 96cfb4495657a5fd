"""Validation with the full segmentation pipeline, and the per-model calibration of the min confidence (like StarDist's
optimize_thresholds)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch

from ..data import LabelledImage
from ..metrics import Scores, evaluate
from ..model import Checkpoint


def validate(checkpoint: Checkpoint, samples: list[LabelledImage], device: str = "auto", cancel=None) -> Scores:
    """Score the checkpoint on whole images with the real pipeline (tiling + watershed)."""
    return validate_by_type(checkpoint, samples, device, cancel)["all"]


def validate_by_type(
    checkpoint: Checkpoint, samples: list[LabelledImage], device: str = "auto", cancel=None
) -> dict[str, Scores]:
    """:func:`validate`'s scores on all images (``"all"``) and on each image type (``data.image_type``)."""
    from ..data import image_type
    from ..segment import segment

    params = _evaluation_params(device)
    with _evaluation_mode(checkpoint.model):
        pairs = [
            _within_roi(sample, segment(checkpoint, sample.image, params, cancel=cancel).labels) for sample in samples
        ]
    types = [image_type(sample.image) for sample in samples]
    by_type = {
        kind: evaluate([pair for pair, other in zip(pairs, types) if other == kind]) for kind in sorted(set(types))
    }
    return {"all": evaluate(pairs), **by_type}


def balanced_score(by_type: dict[str, Scores]) -> float:
    """The mean of the per-type Kaggle DSB2018 scores: each image type counts the same, however many images it has."""
    return float(np.mean([scores.kaggle_score for kind, scores in by_type.items() if kind != "all"]))


# Candidates for a model's min_confidence: 0 keeps every object; above 0.95 little is left.
CONFIDENCE_CANDIDATES = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
CALIBRATION_MIN_IMAGES = 5  # fewer validation images than this: calibrate on the training images too


def calibrate_min_confidence(
    checkpoint: Checkpoint,
    samples: list[LabelledImage],
    device: str = "auto",
    candidates=CONFIDENCE_CANDIDATES,
    cancel=None,
) -> tuple[float, dict[float, float]]:
    """The ``min_confidence`` giving ``samples`` the best Kaggle DSB2018 score with ``checkpoint``, and the score of
    every candidate.

    Like StarDist's ``optimize_thresholds``: a model's probabilities are its own (a model
    fine-tuned on a few images is surer of itself than the one it started from), so the level
    below which an object is more likely a fold or debris than a nucleus is measured per model,
    on its data. The network runs once per image; ties go to the lower value (fewer dropped).
    """
    from ..plane import label_plane
    from ..segment import segment_planes

    params = _evaluation_params(device)
    with _evaluation_mode(checkpoint.model):
        results = [segment_planes(checkpoint, sample.image, params, cancel=cancel) for sample in samples]
    scores = {}
    for value in candidates:
        pairs = [
            _within_roi(
                sample,
                label_plane(
                    result.planes[None].prediction,
                    checkpoint.outputs,
                    replace(result.params.postprocess, min_confidence=value),
                ).labels,
            )
            for sample, result in zip(samples, results)
        ]
        scores[value] = evaluate(pairs).kaggle_score
    return max(candidates, key=lambda value: (scores[value], -value)), scores


def calibrate(
    checkpoint: Checkpoint, samples: list[LabelledImage], description: str, device: str = "auto", cancel=None
) -> float:
    """Calibrate ``checkpoint``'s ``min_confidence`` on ``samples`` and record it in its metadata (saved with it)."""
    value, scores = calibrate_min_confidence(checkpoint, samples, device, cancel=cancel)
    checkpoint.metadata["postprocess"] = {
        "min_confidence": value,
        "calibrated_on": description,
        "kaggle_score_by_min_confidence": {str(k): round(v, 5) for k, v in scores.items()},
    }
    return value


def _evaluation_params(device: str):
    from ..params import BlockParams, SegmentParams, TilingParams

    # Training images are in memory already: segmented whole, so their predictions can be re-labelled.
    # The model as trained: float32 (not re-quantised every epoch), and the images as they are
    # (training reads no stain channel; "auto" would pick one for tissue from the model's metadata).
    return SegmentParams(
        tiling=TilingParams(device=device, precision="float32"), stain="none", blocks=BlockParams(large_plane=1 << 62)
    )


@contextlib.contextmanager
def _evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode within the block; each module's own mode after it (frozen BatchNorm stays frozen)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _within_roi(sample: LabelledImage, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(truth, prediction)`` with both cleared outside the sample's region of interest."""
    if sample.roi is None:
        return sample.labels, labels
    return np.where(sample.roi, sample.labels, 0), np.where(sample.roi, labels, 0)
