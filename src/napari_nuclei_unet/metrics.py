"""Instance segmentation metrics as the field reports them (not pixel accuracy).

* Kaggle DSB2018 score: per image, the mean over IoU thresholds 0.50:0.05:0.95 of
  TP/(TP+FP+FN); then the mean over images. A match needs IoU > threshold, so matches
  are one-to-one. An image with no nuclei and no predictions scores 1.
* AP@0.5 as StarDist reports it: TP/(TP+FP+FN) at IoU 0.5, counted over the whole set.
* Precision, recall and F1 at IoU 0.5, counted over the whole set.
* Pixel Dice and IoU of the foreground, pooled over the whole set.

A partly labelled image (only one region's nuclei annotated) is scored inside that region:
:func:`labelled_region`, :func:`inside_region`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

KAGGLE_THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


def iou_matrix(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU of every (true, predicted) object pair, shape ``(n_true, n_pred)``; labels need not be sequential."""
    truth = np.asarray(truth).ravel()
    pred = np.asarray(pred).ravel()
    t_ids, t_inv = np.unique(truth, return_inverse=True)
    p_ids, p_inv = np.unique(pred, return_inverse=True)
    n_t, n_p = len(t_ids), len(p_ids)
    overlap = np.bincount(t_inv.astype(np.int64) * n_p + p_inv, minlength=n_t * n_p).reshape(n_t, n_p)
    # drop background rows/columns
    t_keep = t_ids != 0
    p_keep = p_ids != 0
    area_t = overlap.sum(axis=1)[t_keep]
    area_p = overlap.sum(axis=0)[p_keep]
    inter = overlap[np.ix_(t_keep, p_keep)].astype(np.float64)
    union = area_t[:, None] + area_p[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


@dataclass
class ImageCounts:
    """Matching counts of one image, per Kaggle threshold, plus pixel overlaps."""

    tp: np.ndarray
    n_true: int
    n_pred: int
    pixel_inter: int
    pixel_true: int
    pixel_pred: int

    @property
    def kaggle_score(self) -> float:
        fp = self.n_pred - self.tp
        fn = self.n_true - self.tp
        denominator = self.tp + fp + fn
        per_threshold = np.divide(self.tp, denominator, out=np.ones(len(self.tp)), where=denominator > 0)
        return float(per_threshold.mean())


def labelled_region(truth: np.ndarray) -> np.ndarray:
    """The part of a partly labelled image that its annotators labelled: the labels closed over gaps of up to about
    two nuclei (the median's diameter as the radius), holes filled."""
    from scipy import ndimage as ndi
    from skimage.morphology import disk

    foreground = truth > 0
    if not foreground.any():
        return foreground
    areas = np.bincount(truth.ravel())[1:]
    radius = max(2, int(round(np.sqrt(4 * np.median(areas[areas > 0]) / np.pi))))
    padded = np.pad(foreground, radius)
    # Eroded 1 px less than dilated: a closing by a digital disk leaves notches where gaps meet a straight edge.
    closed = ndi.binary_erosion(ndi.binary_dilation(padded, disk(radius)), disk(radius - 1), border_value=1)
    return ndi.binary_fill_holes(closed[radius:-radius, radius:-radius] | foreground)


def inside_region(labels: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``labels`` without the objects that lie mostly (half or more) outside ``region``."""
    labels = np.asarray(labels)
    sizes = np.bincount(labels.ravel())
    inside = np.bincount(labels[region].ravel(), minlength=sizes.size)
    outside = inside * 2 < sizes
    outside[0] = False
    return np.where(outside[labels], 0, labels)


def match_image(truth: np.ndarray, pred: np.ndarray) -> ImageCounts:
    """Count true positives at each Kaggle threshold for one image pair."""
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth shape {truth.shape} != prediction shape {pred.shape}")
    iou = iou_matrix(truth, pred)
    # IoU > t >= 0.5 makes matches unique, so counting pairs above t counts TPs.
    tp = np.array([(iou > t).sum() for t in KAGGLE_THRESHOLDS], dtype=np.int64)
    fg_t, fg_p = truth > 0, pred > 0
    return ImageCounts(
        tp=tp,
        n_true=iou.shape[0],
        n_pred=iou.shape[1],
        pixel_inter=int(np.count_nonzero(fg_t & fg_p)),
        pixel_true=int(np.count_nonzero(fg_t)),
        pixel_pred=int(np.count_nonzero(fg_p)),
    )


@dataclass
class Scores:
    """Set-level metrics; ``n_images`` and object counts say what they were computed on."""

    kaggle_score: float
    ap50: float
    precision50: float
    recall50: float
    f1_50: float
    dice: float
    iou: float
    n_images: int
    n_true: int
    n_pred: int

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(counts: Iterable[ImageCounts]) -> Scores:
    """Combine per-image counts into the set's scores."""
    counts = list(counts)
    if not counts:
        raise ValueError("no images to score")
    tp50 = sum(int(c.tp[0]) for c in counts)
    n_true = sum(c.n_true for c in counts)
    n_pred = sum(c.n_pred for c in counts)
    fp50, fn50 = n_pred - tp50, n_true - tp50
    inter = sum(c.pixel_inter for c in counts)
    pix_t = sum(c.pixel_true for c in counts)
    pix_p = sum(c.pixel_pred for c in counts)

    def ratio(a: float, b: float, empty: float = 1.0) -> float:
        return float(a / b) if b else empty

    return Scores(
        kaggle_score=float(np.mean([c.kaggle_score for c in counts])),
        ap50=ratio(tp50, tp50 + fp50 + fn50),
        precision50=ratio(tp50, tp50 + fp50),
        recall50=ratio(tp50, tp50 + fn50),
        f1_50=ratio(2 * tp50, 2 * tp50 + fp50 + fn50),
        dice=ratio(2 * inter, pix_t + pix_p),
        iou=ratio(inter, pix_t + pix_p - inter),
        n_images=len(counts),
        n_true=n_true,
        n_pred=n_pred,
    )


def image_row(name: str, counts: ImageCounts) -> dict[str, object]:
    """One image's scores, for a per-image table: where a set's score is lost."""
    tp = int(counts.tp[0])
    missed, extra = counts.n_true - tp, counts.n_pred - tp
    pixels = counts.pixel_true + counts.pixel_pred
    return {
        "image": name,
        "nuclei_true": counts.n_true,
        "nuclei_pred": counts.n_pred,
        "matched_at_0.5": tp,
        "dsb_score": round(counts.kaggle_score, 4),
        "ap50": round(tp / (tp + missed + extra), 4) if tp + missed + extra else 1.0,
        "precision50": round(tp / counts.n_pred, 4) if counts.n_pred else 1.0,
        "recall50": round(tp / counts.n_true, 4) if counts.n_true else 1.0,
        "pixel_dice": round(2 * counts.pixel_inter / pixels, 4) if pixels else 1.0,
    }


def evaluate(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> Scores:
    """Scores of ``(truth, prediction)`` label image pairs."""
    return summarize(match_image(t, p) for t, p in pairs)


METRIC_LABELS = {
    "kaggle_score": "DSB2018 score",
    "ap50": "AP@0.5",
    "precision50": "precision@0.5",
    "recall50": "recall@0.5",
    "f1_50": "F1@0.5",
    "dice": "pixel Dice",
    "iou": "pixel IoU",
}


def format_table(rows: dict[str, Scores], extra: dict[str, dict[str, str]] | None = None) -> str:
    """A plain-text table: one row per method, one column per metric."""
    columns = list(METRIC_LABELS)
    extra_columns = sorted({k for v in (extra or {}).values() for k in v})
    header = ["method", *[METRIC_LABELS[c] for c in columns], "images", "nuclei (true/pred)", *extra_columns]
    body = []
    for name, scores in rows.items():
        body.append(
            [
                name,
                *[f"{getattr(scores, c):.3f}" for c in columns],
                str(scores.n_images),
                f"{scores.n_true}/{scores.n_pred}",
            ]
            + [(extra or {}).get(name, {}).get(c, "") for c in extra_columns]
        )
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    lines = [" | ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) for row in [header, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
