"""Training targets from instance labels (foreground, boundary, valid, centre) and the BCE + Dice loss on them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

IGNORE = -1.0  # target value of pixels the loss ignores (outside the region of interest, padding)


def make_targets(labels: np.ndarray, roi: np.ndarray | None = None, boundary_width: int = 2) -> np.ndarray:
    """``(4, Y, X)`` uint8: foreground, boundary (inner contours, ``boundary_width`` px), valid (loss counts), and
    centre (each nucleus's distance to its edge over its largest, 0-255: 255 at its centre, whatever its size)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    foreground = labels > 0
    boundary = find_boundaries(labels, mode="inner") & foreground
    if boundary_width > 1:
        boundary = ndi.binary_dilation(boundary, iterations=boundary_width - 1) & foreground
    valid = np.ones_like(foreground) if roi is None else np.asarray(roi, bool)
    return np.stack([foreground, boundary, valid, centre_target(labels)]).astype(np.uint8)


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


def loss_targets(target: torch.Tensor, outputs: tuple[str, ...] = ("foreground", "boundary")) -> torch.Tensor:
    """Float ``(len(outputs), Y, X)`` targets for :func:`make_loss` from :func:`make_targets` output, one per model
    output in order: invalid pixels -> IGNORE."""
    target = torch.as_tensor(target).float()
    labels = torch.stack([target[TARGET_CHANNELS[name][0]] * TARGET_CHANNELS[name][1] for name in outputs])
    labels[:, target[_VALID] == 0] = IGNORE
    return labels


def make_loss() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """BCE + Dice over every output channel (soft targets for the centre), ignoring pixels marked IGNORE."""
    from segmentation_models_pytorch.losses import DiceLoss, SoftBCEWithLogitsLoss

    dice = DiceLoss(mode="multilabel", from_logits=True, ignore_index=IGNORE)
    bce = SoftBCEWithLogitsLoss(ignore_index=IGNORE)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bce(logits, target) + dice(logits, target)

    return loss
