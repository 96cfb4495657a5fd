"""Training targets from instance labels (foreground, boundary, valid) and the BCE + Dice loss on them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

IGNORE = -1.0  # target value of pixels the loss ignores (outside the region of interest, padding)


def make_targets(labels: np.ndarray, roi: np.ndarray | None = None, boundary_width: int = 2) -> np.ndarray:
    """``(3, Y, X)`` uint8: foreground, boundary (inner contours, ``boundary_width`` px), valid (loss counts)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    foreground = labels > 0
    boundary = find_boundaries(labels, mode="inner") & foreground
    if boundary_width > 1:
        boundary = ndi.binary_dilation(boundary, iterations=boundary_width - 1) & foreground
    valid = np.ones_like(foreground) if roi is None else np.asarray(roi, bool)
    return np.stack([foreground, boundary, valid]).astype(np.uint8)


def loss_targets(target: torch.Tensor) -> torch.Tensor:
    """Float ``(2, Y, X)`` targets for :func:`make_loss` from :func:`make_targets` output: invalid pixels -> IGNORE."""
    target = torch.as_tensor(target).float()
    labels = target[:2].clone()
    labels[:, target[2] == 0] = IGNORE
    return labels


def make_loss() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """BCE + Dice over both output channels, ignoring pixels marked IGNORE."""
    from segmentation_models_pytorch.losses import DiceLoss, SoftBCEWithLogitsLoss

    dice = DiceLoss(mode="multilabel", from_logits=True, ignore_index=IGNORE)
    bce = SoftBCEWithLogitsLoss(ignore_index=IGNORE)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bce(logits, target) + dice(logits, target)

    return loss
