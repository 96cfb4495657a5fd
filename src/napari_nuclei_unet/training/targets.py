"""Training targets from instance labels (foreground, boundary, valid, centre) and the BCE + Dice loss on them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

IGNORE = -1.0  # target value of pixels the loss ignores (outside the region of interest, padding)


def make_targets(labels: np.ndarray, roi: np.ndarray | None = None, boundary_width: int = 2) -> np.ndarray:
    """``(5, Y, X)`` uint8: foreground, boundary (inner contours, ``boundary_width`` px), valid (loss counts),
    centre (each nucleus's distance to its edge over its largest, 0-255: 255 at its centre, whatever its size), and
    touching (the nucleus pixels within ``boundary_width`` px of another nucleus)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    foreground = labels > 0
    boundary = find_boundaries(labels, mode="inner") & foreground
    if boundary_width > 1:
        boundary = ndi.binary_dilation(boundary, iterations=boundary_width - 1) & foreground
    valid = np.ones_like(foreground) if roi is None else np.asarray(roi, bool)
    return np.stack([foreground, boundary, valid, centre_target(labels), touching(labels, boundary_width)]).astype(
        np.uint8
    )


def touching(labels: np.ndarray, width: int = 2) -> np.ndarray:
    """bool: nucleus pixels with a pixel of another nucleus within ``width`` px (a square of side 2 width + 1)."""
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    size = 2 * width + 1
    highest = ndi.maximum_filter(labels, size=size)
    lowest = ndi.minimum_filter(np.where(labels > 0, labels, labels.max() + 1), size=size)  # background: above all
    return (labels > 0) & ((highest != labels) | (lowest != labels))


def centre_target(labels: np.ndarray) -> np.ndarray:
    """uint8: within each nucleus, 255 x its distance to the nucleus's own edge (touching nuclei count as edges) over
    the largest such distance in it; 0 outside."""
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    inner = (labels > 0) & ~find_boundaries(labels, mode="inner")
    distance = ndi.distance_transform_edt(inner)
    largest = np.zeros(int(labels.max()) + 1)
    np.maximum.at(largest, labels[labels > 0], distance[labels > 0])
    scaled = np.where(labels > 0, distance / np.maximum(largest[labels], 1.0), 0.0)
    return np.round(255 * scaled).astype(np.uint8)


# Where each output's target lies in :func:`make_targets`' channels, and its scale.
TARGET_CHANNELS = {"foreground": (0, 1.0), "boundary": (1, 1.0), "centre": (3, 1.0 / 255)}
_VALID = 2
_TOUCHING = 4


def loss_targets(
    target: torch.Tensor, outputs: tuple[str, ...] = ("foreground", "boundary"), with_touching: bool = False
) -> torch.Tensor:
    """Float ``(len(outputs), Y, X)`` targets for :func:`make_loss` from :func:`make_targets` output, one per model
    output in order: invalid pixels -> IGNORE. ``with_touching``: one more channel, where nuclei touch (1) or not (0),
    for a loss that weighs those pixels up."""
    target = torch.as_tensor(target).float()
    labels = torch.stack([target[TARGET_CHANNELS[name][0]] * TARGET_CHANNELS[name][1] for name in outputs])
    labels[:, target[_VALID] == 0] = IGNORE
    if with_touching:
        labels = torch.cat([labels, (target[_TOUCHING] * (target[_VALID] > 0))[None]])
    return labels


def make_loss(
    outputs: tuple[str, ...] = ("foreground", "boundary"), touch_weight: float = 0.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """BCE + Dice over every output channel (soft targets for the centre), ignoring pixels marked IGNORE. With a
    ``touch_weight``, the targets carry :func:`loss_targets`' touching channel last, and the boundary output's BCE
    counts those pixels ``1 + touch_weight`` times."""
    from segmentation_models_pytorch.losses import DiceLoss, SoftBCEWithLogitsLoss

    dice = DiceLoss(mode="multilabel", from_logits=True, ignore_index=IGNORE)
    bce = SoftBCEWithLogitsLoss(ignore_index=IGNORE)
    weighted = "boundary" in outputs and touch_weight > 0
    boundary = outputs.index("boundary") if weighted else -1

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape[1] == logits.shape[1] + 1:
            target, touch = target[:, :-1], target[:, -1]
        else:
            touch = None
        total = bce(logits, target) + dice(logits, target)
        if weighted and touch is not None and bool(touch.any()):
            counted = target[:, boundary] != IGNORE
            pixels = torch.nn.functional.binary_cross_entropy_with_logits(
                logits[:, boundary], target[:, boundary].clamp(0, 1), reduction="none"
            )
            extra = (pixels * touch * counted).sum() / counted.sum().clamp(min=1)
            total = total + touch_weight * extra / logits.shape[1]
        return total

    return loss
