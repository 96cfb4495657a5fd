"""The Kaggle DSB2018 run-length encoding, and RLE CSV files (one codec for everything).

Convention: pixels are numbered from 1, top to bottom then left to right (column-major),
and a mask is written as ``start length`` pairs separated by spaces. A CSV holds one row
per nucleus, ``ImageId,EncodedPixels[,Height,Width]``; an image without nuclei keeps one
row with empty ``EncodedPixels`` (Kaggle's convention for empty predictions), so it is
never lost. Extra columns (``Usage``, ...) are ignored.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import RLEError, check_allocation
from .io import atomic_write, label_dtype

REQUIRED_COLUMNS = ("ImageId", "EncodedPixels")


def encode(mask: np.ndarray) -> str:
    """Encode a 2D boolean mask as a Kaggle RLE string ('' for an empty mask)."""
    starts, lengths = _runs(np.asarray(mask, dtype=bool).ravel(order="F"))
    return _format_runs(starts, lengths)


def decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode a Kaggle RLE string to a 2D boolean mask of ``shape`` (height, width)."""
    starts, lengths = parse_runs(rle)
    _check_runs(starts, lengths, shape)
    check_allocation(int(shape[0]) * int(shape[1]), "the mask", f"RLE of a {shape[0]}x{shape[1]} image")
    flat = np.zeros(shape[0] * shape[1], dtype=bool)
    flat[_run_indices(starts, lengths)] = True
    return flat.reshape(shape, order="F")


def parse_runs(rle: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``'start length ...'`` into 1-based starts and lengths; ValueError says what is wrong."""
    text = rle.strip()
    if not text:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    tokens = text.split()
    if len(tokens) % 2:
        raise ValueError(f"odd number of values ({len(tokens)}); expected 'start length' pairs")
    try:
        values = np.array([int(token) for token in tokens], dtype=np.int64)
    except ValueError:
        raise ValueError(f"non-numeric value {_first_bad(tokens)!r}") from None
    except OverflowError:
        raise ValueError(f"value {max(tokens, key=len)[:30]!r} is too large for a pixel number") from None
    return values[0::2], values[1::2]


def _first_bad(tokens: list[str]) -> str:
    for token in tokens:
        try:
            int(token)
        except ValueError:
            return token[:30]
    return tokens[0][:30]


def _check_runs(starts: np.ndarray, lengths: np.ndarray, shape: tuple[int, int]) -> None:
    size = int(shape[0]) * int(shape[1])
    if (starts < 1).any():
        raise ValueError(f"start {int(starts[starts < 1][0])} is below 1 (pixels are numbered from 1)")
    if (lengths < 1).any():
        raise ValueError(f"run length {int(lengths[lengths < 1][0])} is not positive")
    huge = (starts > size) | (lengths > size)  # checked first: start + length could overflow int64
    if huge.any():
        first = int(np.argmax(huge))
        end = int(starts[first]) + int(lengths[first]) - 1  # Python ints: no overflow
        raise ValueError(f"run ends at pixel {end}, beyond the {shape[0]}x{shape[1]} image ({size} pixels)")
    ends = starts + lengths - 1
    if (ends > size).any():
        raise ValueError(f"run ends at pixel {int(ends.max())}, beyond the {shape[0]}x{shape[1]} image ({size} pixels)")
    order = np.argsort(starts, kind="stable")
    if (starts[order][1:] <= ends[order][:-1]).any():
        raise ValueError("runs overlap")


def _runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based starts and lengths of the True runs of a flat boolean array."""
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    return starts + 1, ends - starts


def _format_runs(starts: np.ndarray, lengths: np.ndarray) -> str:
    pairs = np.empty(2 * len(starts), dtype=np.int64)
    pairs[0::2], pairs[1::2] = starts, lengths
    return " ".join(map(str, pairs.tolist()))


def _run_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """0-based flat indices covered by all runs, without a Python loop over runs."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.repeat(starts - 1 - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return offsets + np.arange(total)


def labels_to_rles(labels: np.ndarray) -> list[tuple[int, str]]:
    """Encode every label of a 2D instance image: ``[(label, rle), ...]`` sorted by label.

    One pass over the pixels (column-major runs of equal value), so it stays fast for
    thousands of nuclei on large images.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected a 2D label image, got shape {labels.shape}")
    flat = labels.ravel(order="F")
    boundaries = np.flatnonzero(np.diff(flat)) + 1
    run_starts = np.concatenate([[0], boundaries])
    run_lengths = np.diff(np.concatenate([run_starts, [flat.size]]))
    run_values = flat[run_starts]
    keep = run_values != 0
    run_starts, run_lengths, run_values = run_starts[keep], run_lengths[keep], run_values[keep]
    order = np.argsort(run_values, kind="stable")  # stable: runs of a label stay in pixel order
    run_starts, run_lengths, run_values = run_starts[order], run_lengths[order], run_values[order]
    unique, first = np.unique(run_values, return_index=True)
    bounds = np.append(first, len(run_values))
    return [
        (int(value), _format_runs(run_starts[a:b] + 1, run_lengths[a:b]))
        for value, a, b in zip(unique, bounds[:-1], bounds[1:])
    ]


@dataclass
class RLEImage:
    """The rows of one ImageId in an RLE CSV: the shape if known, and each nucleus' runs."""

    image_id: str
    shape: tuple[int, int] | None = None
    rles: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # CSV line numbers, for error messages
    overlap_pixels: int = 0  # set by to_labels: pixels that two rows claimed

    def to_labels(self, shape: tuple[int, int] | None = None, source: str = "") -> np.ndarray:
        """Decode to an instance label image (1..N in row order), checking each row's runs.

        A row whose own runs overlap is malformed. Pixels claimed by two rows stay with the
        first; their number is left in ``overlap_pixels``.
        """
        shape = tuple(shape or self.shape or ())
        where = f"{source}: " if source else ""
        if len(shape) != 2:
            raise RLEError(
                f"{where}ImageId {self.image_id!r}: image shape unknown (no Height/Width columns and no image found)"
            )
        size = int(shape[0]) * int(shape[1])
        check_allocation(
            size * label_dtype(len(self.rles)).itemsize,
            f"ImageId {self.image_id!r}'s {shape[0]}x{shape[1]} labels",
            source or "RLE CSV",
        )
        parsed = []
        for rle, row in zip(self.rles, self.rows):
            try:
                starts, lengths = parse_runs(rle)
                _check_runs(starts, lengths, shape)
            except ValueError as error:
                raise RLEError(f"{where}row {row} (ImageId {self.image_id!r}): {error}") from None
            if len(starts):
                parsed.append((starts, lengths, row))
        counts = [len(p[0]) for p in parsed]
        starts = np.concatenate([p[0] for p in parsed]) if parsed else np.zeros(0, np.int64)
        lengths = np.concatenate([p[1] for p in parsed]) if parsed else np.zeros(0, np.int64)
        check_allocation(4 * 8 * int(lengths.sum()), f"ImageId {self.image_id!r}'s runs", source or "RLE CSV")
        values = np.repeat(np.arange(1, len(parsed) + 1), counts)
        indices = _run_indices(starts, lengths)
        pixel_values = np.repeat(values, lengths)
        flat = np.zeros(size, dtype=label_dtype(len(parsed)))
        order = np.argsort(starts, kind="stable")
        self.overlap_pixels = 0
        if (starts[order][1:] <= (starts + lengths - 1)[order][:-1]).any():
            # Real annotations (DSB2018) sometimes give a pixel to two nuclei: the first row keeps it.
            by_pixel = np.lexsort((pixel_values, indices))
            indices, pixel_values = indices[by_pixel], pixel_values[by_pixel]
            first = np.concatenate([[True], indices[1:] != indices[:-1]])
            self.overlap_pixels = int((~first).sum())
            indices, pixel_values = indices[first], pixel_values[first]
        flat[indices] = pixel_values
        return flat.reshape(shape, order="F")


def looks_like_rle_csv(path: str | os.PathLike) -> bool:
    """True when the file's header has the ImageId and EncodedPixels columns (cheap: reads one line)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle, delimiter=_delimiter(handle)), [])
    except (OSError, UnicodeDecodeError):
        return False
    return all(column in [h.strip() for h in header] for column in REQUIRED_COLUMNS)


def _delimiter(handle) -> str:
    """The header line's delimiter: a comma, or the semicolon or tab that spreadsheets in many locales save with
    (an RLE never holds either). The handle is left at the start."""
    first = handle.readline()
    handle.seek(0)
    return next((mark for mark in (";", "\t") if mark in first and "," not in first), ",")


def read_csv(path: str | os.PathLike) -> dict[str, RLEImage]:
    """Read an RLE CSV into ``{ImageId: RLEImage}`` in file order; the runs are checked on decoding."""
    path = Path(path)
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
    except OSError as error:
        raise RLEError(f"{path}: cannot open ({error.strerror})") from None
    images: dict[str, RLEImage] = {}
    with handle:
        try:
            reader = csv.reader(handle, delimiter=_delimiter(handle))
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise RLEError(f"{path}: empty file, expected a header 'ImageId,EncodedPixels'") from None
        except (csv.Error, UnicodeDecodeError) as error:
            raise RLEError(f"{path}: not a readable CSV ({error})") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise RLEError(f"{path}: not an RLE CSV, missing column(s) {', '.join(missing)}")
        id_col, rle_col = header.index("ImageId"), header.index("EncodedPixels")
        h_col = header.index("Height") if "Height" in header else None
        w_col = header.index("Width") if "Width" in header else None
        try:
            for row in reader:
                line = reader.line_num
                if not row or not any(cell.strip() for cell in row):
                    continue
                if len(row) <= max(id_col, rle_col):
                    raise RLEError(
                        f"{path}: row {line}: expected at least {max(id_col, rle_col) + 1} columns, got {len(row)}"
                    )
                image_id = row[id_col].strip()
                if not image_id:
                    raise RLEError(f"{path}: row {line}: empty ImageId")
                entry = images.setdefault(image_id, RLEImage(image_id))
                if h_col is not None and w_col is not None:
                    entry.shape = _row_shape(path, line, row, h_col, w_col, entry.shape)
                rle = row[rle_col].strip()
                if rle:
                    entry.rles.append(rle)
                    entry.rows.append(line)
        except (csv.Error, UnicodeDecodeError) as error:
            raise RLEError(f"{path}: not a readable CSV near row {reader.line_num} ({error})") from None
    return images


def _row_shape(path, line, row, h_col, w_col, known):
    try:
        shape = (int(row[h_col]), int(row[w_col]))
    except (ValueError, IndexError):
        raise RLEError(f"{path}: row {line}: Height/Width must be integers") from None
    if min(shape) < 1:
        raise RLEError(f"{path}: row {line}: Height/Width must be positive")
    if known is not None and known != shape:
        raise RLEError(f"{path}: row {line}: Height/Width {shape} differ from earlier rows {known}")
    return shape


def decode_csv(
    path: str | os.PathLike, shape_of: Callable[[str], tuple[int, int] | None] | None = None
) -> dict[str, np.ndarray]:
    """Decode every ImageId of an RLE CSV to a label image.

    Shapes come from Height/Width columns, otherwise from ``shape_of(image_id)``.
    """
    labels = {}
    for image_id, entry in read_csv(path).items():
        shape = entry.shape or (shape_of(image_id) if shape_of else None)
        labels[image_id] = entry.to_labels(shape, source=str(path))
    return labels


def plane_ids(stem: str, planes: int | tuple[int, ...]) -> list[str]:
    """The ImageIds of a stack's planes in an RLE CSV: ``<stem>_<plane>`` (the nuclei keep their IDs across planes),
    or ``<stem>_<t>_<z>`` for a time-lapse of Z-stacks (``planes`` its leading shape, ``(T, Z)``)."""
    shape = (planes,) if isinstance(planes, int) else tuple(planes)
    return [f"{stem}_{'_'.join(map(str, index))}" for index in np.ndindex(*shape)]


def rle_items(stem: str, labels: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """``(ImageId, plane)`` of a label image (``stem``) or of each plane of a stack or time-lapse of Z-stacks
    (:func:`plane_ids`)."""
    if labels.ndim == 2:
        return [(stem, labels)]
    return list(zip(plane_ids(stem, labels.shape[:-2]), labels.reshape(-1, *labels.shape[-2:])))


def write_csv(path: str | os.PathLike, items: Iterable[tuple[str, np.ndarray]], with_shape: bool = True) -> Path:
    """Write ``(image_id, label_image)`` pairs as one RLE CSV, atomically; empty images keep one row."""
    path = Path(path)
    with atomic_write(path, "w") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["ImageId", "EncodedPixels", "Height", "Width"] if with_shape else ["ImageId", "EncodedPixels"])
        for image_id, labels in items:
            extra = [labels.shape[0], labels.shape[1]] if with_shape else []
            rows = labels_to_rles(labels)
            if not rows:
                writer.writerow([image_id, "", *extra])
            for _, rle in rows:
                writer.writerow([image_id, rle, *extra])
    return path


def join_csv_parts(path: str | os.PathLike, parts: Iterable[str | os.PathLike]) -> Path:
    """One RLE CSV from CSVs that :func:`write_csv` wrote with the same columns, atomically: the
    first header, then every part's rows, in order (one part in memory at a time)."""
    path = Path(path)
    with atomic_write(path, "w") as handle:
        for index, part in enumerate(parts):
            with open(part, encoding="utf-8", newline="") as source:
                header = source.readline()
                if index == 0:
                    handle.write(header)
                shutil.copyfileobj(source, handle)
    return path
