"""Read microscopy images of any common dtype and layout, normalise them, write outputs atomically.

Images are read with tifffile (TIFF) and imageio (PNG, JPEG, ...). The layout rules:

* ``(Y, X)`` grey, ``(Y, X, 3|4)`` RGB/RGBA;
* ``(N, Y, X)`` and ``(N, Y, X, 3|4)`` stacks (Z or T), segmented one plane at a time.

Normalisation uses per-image percentiles, so 8-bit brightfield and 16-bit fluorescence
land on the same scale. The percentiles are computed once (on a subsample for big
images) and applied per tile, so no float copy of the whole image is ever made.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, check_allocation, describe
from .params import AUTO, split_channel_axis, stack_of_axes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".svs", ".ndpi")
# Microscope vendors' formats, not read here (Bio-Formats reads them): the error says how to bring them in.
VENDOR_SUFFIXES = (".czi", ".nd2", ".lif", ".lsm", ".oib", ".oir", ".vsi", ".ims", ".dv", ".mrxs", ".scn", ".lof")
_VENDOR_ADVICE = " (a microscope vendor's format: save as OME-TIFF first, e.g. with Fiji's Bio-Formats Exporter)"
_TIFF_SUFFIXES = (".tif", ".tiff")  # written and read
TIFF_READ_SUFFIXES = (*_TIFF_SUFFIXES, ".svs", ".ndpi")  # whole-slide formats that are TIFFs, read only
# Percentiles are estimated from at most this many pixels: exact enough, and cheap on huge images.
_PERCENTILE_SAMPLE = 2_000_000


def read_image(path: str | os.PathLike, channel_axis: int | None = None) -> np.ndarray:
    """Read an image file as a numpy array, raising :class:`InputError` naming the file on failure.

    ``channel_axis``: an axis of channels the caller takes one of (:func:`nuclear_channel`); the layout
    is checked without it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise InputError(
            f"{path}: unsupported image type {suffix or '(no suffix)'!r}; use one of {', '.join(IMAGE_SUFFIXES)}"
            + (_VENDOR_ADVICE if suffix in VENDOR_SUFFIXES else "")
        )
    check_allocation(declared_bytes(path), "the image it declares", path)
    try:
        if suffix in TIFF_READ_SUFFIXES:
            import tifffile

            image = tifffile.imread(path)
        else:
            import imageio.v3 as iio

            image = iio.imread(path)
    except MemoryError:
        raise InputError(f"{path}: too large to read into memory") from None
    except Exception as error:  # noqa: BLE001 (the readers raise many types for corrupt files)
        raise InputError(f"{path}: cannot read image ({describe(error)})") from None
    image = np.asarray(image)
    check_image_layout(image, name=str(path), channel_axis=channel_axis)
    return image


def declared_bytes(path: Path) -> int:
    """Bytes of the pixels a file's header declares (0 when the header can't be read: the
    reader then reports the problem), read before any pixel is decoded."""
    try:
        if path.suffix.lower() in TIFF_READ_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return sum(int(np.prod(s.shape, dtype=np.float64)) * np.dtype(s.dtype).itemsize for s in tif.series)
        import imageio.v3 as iio

        props = iio.improps(path)
        return int(np.prod(props.shape, dtype=np.float64)) * np.dtype(props.dtype).itemsize
    except Exception as error:  # noqa: BLE001 (a broken header: read_image's own reader names the fault)
        logging.getLogger(__name__).debug("%s: header not readable (%s)", path, describe(error))
        return 0


def check_image_layout(image, name: str = "image", channel_axis: int | None = None) -> None:
    """Raise :class:`InputError` unless ``image`` is a 2D plane or a stack of them, grey or RGB(A) (once its
    ``channel_axis``, if any, is taken away)."""
    shape = tuple(image.shape)
    if channel_axis is not None and 0 <= channel_axis < len(shape) - 2:
        shape = shape[:channel_axis] + shape[channel_axis + 1 :]
    dtype = np.dtype(image.dtype)
    if dtype.kind not in "buif":
        raise InputError(f"{name}: unsupported pixel type {dtype}")
    if len(shape) < 2 or len(shape) > 4 or min(shape) == 0:
        raise InputError(f"{name}: expected a 2D image or a stack of 2D images, got shape {shape}")


def check_stack_layout(image, stack: str) -> None:
    """Raise :class:`InputError` unless a 4D ``image`` is a stack of RGB(A) planes, or a time-lapse of Z-stacks
    (``stack`` "tz"): what the axes of a 4D grey image are cannot be guessed."""
    shape = tuple(image.shape)
    if stack == "tz" and len(shape) != 4:
        raise InputError(f"a time-lapse of Z-stacks (T, Z, Y, X) is 4D, got shape {shape}")
    if len(shape) == 4 and stack != "tz" and not is_rgb(image):
        raise InputError(
            f"4D images must be stacks of RGB/RGBA planes (N, Y, X, 3|4), or say their axes: a time-lapse of Z-stacks "
            f"(--axes TZYX), or channels (--axes ZCYX or CZYX); got shape {shape}"
        )


def is_rgb(image) -> bool:
    """True when the last axis holds colour channels (3 or 4, and smaller than the spatial axes)."""
    shape = image.shape
    return len(shape) >= 3 and shape[-1] in (3, 4) and shape[-1] < min(shape[-3], shape[-2])


def is_single_plane(image) -> bool:
    """True for one 2D image (grey or colour), False for a Z/T stack."""
    return image.ndim - (1 if is_rgb(image) else 0) == 2


def plane_count(image) -> int:
    """Number of 2D planes: 1 for a single image, N for a Z/T stack."""
    return 1 if is_single_plane(image) else int(image.shape[0])


def planes(image) -> Iterator:
    """Yield the 2D planes (grey ``(Y, X)`` or colour ``(Y, X, C)``) of an image or stack, lazily."""
    if is_single_plane(image):
        yield image
    else:
        for index in range(image.shape[0]):
            yield image[index]


def brightest_channel(plane):
    """Each pixel's brightest colour channel (HSV value) of an RGB plane; a grey plane as it is (not read).

    A pseudo-coloured fluorescence image (Hoechst rendered blue, GFP green) is its grey intensity times one
    colour: this undoes the colour, whatever it is, and keeps every channel of a merged one."""
    if len(plane.shape) == 2:
        return plane
    plane = np.asarray(plane)
    if plane.shape[-1] == 1:
        return plane[..., 0]
    brightest = np.maximum(plane[..., 0], plane[..., 1])  # ~25x faster than max(axis=-1) over 3 values
    if plane.shape[-1] > 2:
        np.maximum(brightest, plane[..., 2], out=brightest)
    return brightest


def hematoxylin(plane) -> np.ndarray:
    """Hematoxylin optical density of a brightfield RGB plane (Ruifrok & Johnston colour deconvolution), float32."""
    from skimage.color import rgb2hed

    if plane.ndim != 3:
        raise InputError("the hematoxylin stain option needs an RGB image")
    return rgb2hed(np.asarray(plane)[..., :3])[..., 0].astype(np.float32)


def guess_nuclear_channel(channels) -> int:
    """Index of the channel that most looks like a nuclear stain (DAPI, Hoechst), from a list of 2D planes.

    Nuclei are compact bright objects on a dark background that cover a minority of the
    field; cytoplasm or membrane stains cover more of it, and with less contrast. Each
    channel is split by Otsu's threshold on a strided sample; channels whose bright part
    covers at most 60% of the field compete on the contrast between the two parts (in units
    of the channel's spread). Ties go to the last channel (blue, where RGB composites put DAPI).
    """
    best, best_score = len(channels) - 1, -np.inf
    for index, channel in enumerate(channels):
        split = _otsu_split(channel)
        if split is None:
            continue
        values, bright = split
        if not 0.0 < bright.mean() <= 0.6:
            continue
        score = float((values[bright].mean() - values[~bright].mean()) / (values.std() + 1e-6))
        if score >= best_score:
            best, best_score = index, score
    return best


def looks_like_channels(planes) -> bool:
    """Whether a stack's few planes (at most ``_FEW_CHANNELS``) are different stains rather than planes of one
    (:func:`planes_look_alike`): how a stack whose axes are not stated is read, in the CLI and the widget alike."""
    return len(planes) <= _FEW_CHANNELS and not planes_look_alike(planes)


_FEW_CHANNELS = 4  # more planes than this, axes unstated: a Z/T stack


def planes_look_alike(planes) -> bool:
    """Whether a few planes look like one stain (the planes of a Z/T stack) rather than
    different channels: their bright parts (Otsu) cover about the same share of the field."""
    fractions = [float(split[1].mean()) for split in map(_otsu_split, planes) if split is not None]
    return len(fractions) < 2 or max(fractions) - min(fractions) < 0.15


def _otsu_split(plane) -> tuple[np.ndarray, np.ndarray] | None:
    """A strided sample of the plane and its pixels above Otsu's threshold; None for a flat plane."""
    from skimage.filters import threshold_otsu

    step = sample_step(*plane.shape[:2])
    values = np.asarray(plane[::step, ::step], dtype=np.float32).ravel()
    if values.size < 16 or values.max() == values.min():
        return None
    return values, values > threshold_otsu(values)


def shown_pixels(sample: np.ndarray) -> np.ndarray:
    """A plane's pixels that carry the image, for its statistics: of an RGBA plane, the colour of the pixels that are
    not fully transparent (``(N, 3)``; a slide exported with a transparent, black surround would otherwise count its
    surround as dark background); of other planes, the plane (colour without alpha)."""
    if sample.ndim != 3:
        return sample
    if sample.shape[-1] == 4:
        opaque = sample[..., 3] > 0
        if opaque.any() and not opaque.all():
            return sample[opaque][:, :3]
    return sample[..., :3]


def sample_step(height: int, width: int, pixels: int = _PERCENTILE_SAMPLE) -> int:
    """Stride that leaves at most ~``pixels`` pixels of a plane (default: enough for its percentiles)."""
    return max(1, int(np.ceil(np.sqrt(height * width / pixels))))


def exact_percentiles(values: np.ndarray, q) -> np.ndarray:
    """``np.percentile(values, q)`` to the last bit, from a histogram for 8- and 16-bit unsigned images (most
    microscopy files): a count and a cumulative sum instead of a partial sort, 2-7x faster."""
    if values.dtype not in (np.uint8, np.uint16) or values.size == 0:
        return np.percentile(values, q)
    cumulative = np.cumsum(np.bincount(values.ravel()))
    position = np.asarray(q, dtype=np.float64) / 100.0 * (values.size - 1)
    below = np.floor(position)
    fraction = position - below
    lower = np.searchsorted(cumulative, below, side="right").astype(np.float64)  # the sorted values there
    upper = np.searchsorted(cumulative, np.minimum(below + 1, values.size - 1), side="right").astype(np.float64)
    step = upper - lower
    return np.where(fraction >= 0.5, upper - step * (1 - fraction), lower + step * fraction)  # numpy's own lerp


@dataclass(frozen=True)
class Normalizer:
    """Maps raw pixel values of one image to the model's input: float32 ``(C, Y, X)`` in [0, 1].

    ``low``/``high`` are the image's percentiles, pooled over colour channels so that
    colour ratios (H&E stains) are kept. Greys are repeated to fill RGB models; colour is
    averaged for single-channel models; alpha is dropped.
    """

    low: float
    high: float
    channels: int = 3

    @classmethod
    def from_image(cls, plane, channels: int = 3, percentiles: tuple[float, float] = (1.0, 99.8)) -> Normalizer:
        """Estimate the percentiles of a 2D plane (numpy, dask or zarr), subsampling big ones."""
        step = sample_step(*plane.shape[:2])
        sample = shown_pixels(np.asarray(plane[::step, ::step]))
        if sample.dtype == bool:  # a mask: 0 and 1
            sample = sample.view(np.uint8)
        low, high = exact_percentiles(sample, percentiles)
        low, high = float(low), float(high)
        if not np.isfinite(low) or not np.isfinite(high):
            raise InputError("image contains NaN or infinite values")
        if high <= low:  # flat image: map it to 0 instead of dividing by zero
            high = low + 1.0
        return cls(low=low, high=high, channels=channels)

    def __call__(self, plane) -> np.ndarray:
        """Normalise a (crop of a) plane to float32 ``(C, Y, X)``."""
        out = channels_first(plane)
        out -= np.float32(self.low)
        out *= np.float32(1.0 / (self.high - self.low))
        np.clip(out, 0.0, 1.0, out=out)  # the same range in training (colour/gamma augmentation) and inference
        return to_model_channels(out, self.channels)


def channels_first(plane) -> np.ndarray:
    """A grey or ``(Y, X, C)`` plane as float32 ``(C, Y, X)``, alpha dropped (a new array)."""
    array = np.asarray(plane)
    array = np.moveaxis(array[..., :3], -1, 0) if array.ndim == 3 else array[None]
    return array.astype(np.float32, copy=True)


def to_model_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """``(C, Y, X)`` as the model's channels: colour averaged for a single-channel model, grey repeated for colour
    ones."""
    if array.shape[0] == channels:
        return array
    if channels == 1:
        return array.mean(axis=0, keepdims=True)
    if array.shape[0] == 1:
        return np.repeat(array, channels, axis=0)
    raise InputError(f"cannot map a {array.shape[0]}-channel image to a {channels}-channel model")


def label_dtype(max_label: int) -> np.dtype:
    """uint16 when the labels fit, uint32 otherwise."""
    return np.dtype(np.uint16) if max_label < 2**16 else np.dtype(np.uint32)


def default_mode(directory: bool = False) -> int:
    """The permissions a plain ``open``/``mkdir`` would give under the current umask.

    Temp files and folders (mkstemp/mkdtemp) are private; outputs renamed into place should not be.
    """
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed over ``path`` only if the block succeeds.

    An interrupted or failed write leaves any existing ``path`` untouched and no partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    os.chmod(tmp_name, default_mode())  # mkstemp makes 0600
    try:
        yield Path(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Like :func:`atomic_path`, but yields an open file (text mode writes UTF-8 with newline='')."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"newline": "", "encoding": "utf-8"})) as handle:
            yield handle


def write_labels(path: str | os.PathLike, labels, max_label: int | None = None) -> Path:
    """Write an instance label image (uint16, or uint32 when needed) to ``.tif`` or ``.png``, atomically.

    A 2D zarr or dask array goes to a tiled TIFF one band of tiles at a time, so labels
    larger than memory can be written. ``max_label``, when known, saves a pass over them.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    lazy = not isinstance(labels, np.ndarray) and len(labels.shape) == 2 and suffix in _TIFF_SUFFIXES
    if not lazy:
        labels = np.asarray(labels)
    if max_label is None:
        max_label = max((int(band.max()) for band in (_bands(labels) if lazy else [labels]) if band.size), default=0)
    dtype = label_dtype(max_label)
    if suffix in _TIFF_SUFFIXES:
        import tifffile

        with atomic_path(path) as tmp:
            if lazy:
                tiles = (tile for band in _bands(labels) for tile in _split_columns(band.astype(dtype, copy=False)))
                tifffile.imwrite(
                    tmp,
                    tiles,
                    shape=labels.shape,
                    dtype=dtype,
                    tile=(_TIFF_TILE, _TIFF_TILE),
                    compression="zlib",
                    photometric="minisblack",
                )
            else:  # grey pages: tifffile would store 3 or 4 planes as one RGB(A) image
                tifffile.imwrite(tmp, labels.astype(dtype, copy=False), compression="zlib", photometric="minisblack")
    elif suffix == ".png":
        if dtype != np.uint16 or labels.ndim != 2:
            raise InputError(f"{path}: PNG holds one 2D plane of at most 65535 labels; use .tif")
        import imageio.v3 as iio

        with atomic_path(path) as tmp:
            iio.imwrite(tmp, labels.astype(np.uint16), extension=".png")
    else:
        raise InputError(f"{path}: label images are written as .tif or .png, not {suffix!r}")
    return path


_TIFF_TILE = 512  # px: tile edge of label TIFFs written from zarr/dask


def _bands(labels) -> Iterator[np.ndarray]:
    """Rows of tiles of a 2D zarr or dask array, read one at a time as numpy."""
    for top in range(0, labels.shape[0], _TIFF_TILE):
        yield np.asarray(labels[top : top + _TIFF_TILE])


def _split_columns(band: np.ndarray) -> Iterator[np.ndarray]:
    for left in range(0, band.shape[1], _TIFF_TILE):
        yield band[:, left : left + _TIFF_TILE]


def find_images(inputs: list[str]) -> list[Path]:
    """Expand files, folders and glob patterns to a sorted, de-duplicated list of image files and ``.zarr`` stores.

    A folder's hidden files are left out, as a shell's patterns leave them: macOS writes ``._<name>`` beside every
    file it copies to a shared or FAT drive, and those are not images."""
    import glob

    def is_image(p: Path) -> bool:
        return (p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()) or (p.suffix.lower() == ".zarr" and p.is_dir())

    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and path.suffix.lower() != ".zarr":
            found.extend(p for p in sorted(path.iterdir()) if is_image(p) and not p.name.startswith("."))
        elif path.exists():
            found.append(path)
        else:
            matches = sorted(glob.glob(item))
            if not matches:
                raise InputError(f"{item}: no such file, folder or matching pattern")
            found.extend(Path(m) for m in matches if is_image(Path(m)))
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        vendor = sorted({p.suffix.lower() for item in inputs if Path(item).is_dir() for p in Path(item).iterdir()})
        vendor = [suffix for suffix in vendor if suffix in VENDOR_SUFFIXES]
        raise InputError(
            f"{', '.join(inputs)}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} and .zarr stores)"
            + (f"; found {', '.join(vendor)} files{_VENDOR_ADVICE}" if vendor else "")
        )
    return unique


def image_shape_lookup(folder: str | os.PathLike):
    """``image_id -> (height, width)`` from ``<folder>/<id>.<ext>``, ``<folder>/images/<id>.<ext>``
    or the Kaggle layout ``<folder>/<id>/images/<id>.png``, reading only the file headers;
    None when not found."""
    root = Path(folder)

    def shape_of(image_id: str) -> tuple[int, int] | None:
        candidates = [base / f"{image_id}{s}" for base in (root, root / "images") for s in IMAGE_SUFFIXES]
        candidates.append(root / image_id / "images" / f"{image_id}.png")
        for candidate in candidates:
            if not candidate.is_file():
                continue
            if candidate.suffix.lower() in TIFF_READ_SUFFIXES:
                import tifffile

                with tifffile.TiffFile(candidate) as tif:
                    return tuple(tif.pages[0].shape[:2])
            import imageio.v3 as iio

            return tuple(iio.improps(candidate).shape[:2])
        return None

    return shape_of


def file_stack(path, axes: str | None = None) -> tuple[str, tuple[float, float, float] | None]:
    """What a file's own metadata says of its stack: ``(stack, voxel size Z,Y,X)``: ImageJ hyperstacks and OME-TIFF,
    OME-Zarr (NGFF ``multiscales`` axes and scale) and zarr arrays with ``_ARRAY_DIMENSIONS`` (xarray's, and what
    ``segment --out-format zarr`` writes). ``("auto", None)`` when it says nothing, or for other formats. A channel
    axis does not count: one channel is segmented (:func:`nuclear_channel`). ``axes``: :func:`file_axes`, when the
    caller has read them already."""
    import tifffile

    if Path(path).suffix.lower() == ".zarr":
        return _zarr_stack(path)
    axes, _ = split_channel_axis(file_axes(path) if axes is None else axes)
    try:
        stack = stack_of_axes(axes) if axes[:1] in ("Z", "T") else AUTO
    except ValueError:  # e.g. ZTYX: not one of the stacks segmented
        return AUTO, None
    if stack == AUTO:
        return AUTO, None
    try:
        with tifffile.TiffFile(path) as tif:
            return stack, _voxel_size(tif) if stack in ("z", "tz") else None
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError):
        return stack, None


def file_axes(path) -> str:
    """A TIFF's axes as its metadata names them (ImageJ, OME: e.g. ZCYX); "" when they are not stated, or for
    other formats. tifffile's Q (unknown) and I (image sequence) say nothing of what the axis is."""
    import tifffile

    if Path(path).suffix.lower() not in TIFF_READ_SUFFIXES:
        return ""
    try:
        with tifffile.TiffFile(path) as tif:
            axes = tif.series[0].axes.upper()
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError):
        return ""
    return "" if "Q" in axes or axes.startswith("I") else axes


def channel_axis(image, axes: str, given: int | None = None, stack_stated: bool = False) -> int | None:
    """Where ``image``'s channels are: ``given`` (the user's), else the C of ``axes`` (the file's), else the last
    axis of a plane with one or two channels there (grey + alpha, two stains; never planes 1 or 2 px wide), else,
    when ``axes`` are not stated, the first axis of a few planes that look like different stains
    (:func:`looks_like_channels`) unless the user said what the stack is (``stack_stated``); None when it has
    none."""
    if given is not None:
        if not 0 <= given < len(image.shape) - 2:
            raise InputError(
                f"the axes say channels come before Y and X, but the image's shape is {tuple(image.shape)}"
            )
        return given
    _, position = split_channel_axis(axes)
    if position is not None and len(axes) == len(image.shape):
        return position
    shape = image.shape
    if len(shape) == 3 and shape[-1] in (1, 2) and shape[-1] < min(shape[:2]):
        return 2
    unstated = not axes and not stack_stated and len(shape) == 3 and shape[0] < min(shape[1:])
    return 0 if unstated and looks_like_channels([image[i] for i in range(shape[0])]) else None


def nuclear_plane_of(
    image, axes: str, path, channel: int | str = AUTO, given_axis: int | None = None, stack_stated: bool = False
) -> tuple[object, dict]:
    """The nuclear channel (``channel``: a number, or "auto") of an image read from ``path``, whose file states
    ``axes`` (:func:`file_axes`), when it has channels (:func:`channel_axis`; ``given_axis``, ``stack_stated``: what
    the user said), with ``{"channel": picked, "channels": count}``; the image as it is, and ``{}``, when it has
    none (an RGB image is read in colour unless a channel number is given). Segmentation and training read files
    through this, alike."""
    axis = channel_axis(image, axes, given_axis, stack_stated)
    if axis is None and channel not in (AUTO, None) and is_rgb(image):  # asked for: one colour of a composite
        axis = len(image.shape) - 1
    if axis is None:
        if channel not in (AUTO, None):
            raise InputError(f"{path}: --channel {channel} given, but the image has no channel axis")
        return image, {}
    count = int(image.shape[axis])
    image, picked = nuclear_channel(image, axis, channel)
    if axis == 0 and given_axis is None and not axes:  # read from how its planes look: say so, and how to undo it
        logging.getLogger(__name__).warning(
            "%s: %d planes that look like different stains, and the file does not say: read as channels, channel %d "
            "segmented (--axes ZYX or TYX: a stack)",
            path,
            count,
            picked,
        )
    return image, {"channel": picked, "channels": count}


def nuclear_channel(image, axis: int, channel: int | str = AUTO) -> tuple[object, int]:
    """``image`` without its channel ``axis``: only ``channel`` (a number, or "auto": :func:`guess_nuclear_channel`
    on the middle plane of each channel). Lazy arrays (zarr, dask) stay lazy. Returns the image and the channel."""
    count = int(image.shape[axis])
    if channel == AUTO:
        channel = guess_nuclear_channel([middle_plane(take_channel(image, axis, index)) for index in range(count)])
    elif not 0 <= int(channel) < count:
        raise InputError(f"channel {channel} asked for, but the image has {count} channels (0 to {count - 1})")
    return take_channel(image, axis, int(channel)), int(channel)


def take_channel(image, axis: int, index: int):
    """``image`` at ``index`` along ``axis`` (-1: the colour of an RGB image); a lazy array through dask, so nothing
    is read yet."""
    if not isinstance(image, np.ndarray):
        import dask.array as da

        image = da.from_array(image, chunks=getattr(image, "chunks", "auto"))
    return image[(slice(None),) * (axis % len(image.shape)) + (index,)]


def middle_plane(image):
    """The middle 2D plane (grey, or colour) of an image or stack (lazy stays lazy: only a sample of it is read)."""
    while len(image.shape) > (3 if is_rgb(image) else 2):
        image = image[image.shape[0] // 2]
    return image


def open_zarr_array(path):
    """The array of a ``.zarr`` store, lazily: the store's own, or a group's first (OME-Zarr keeps level 0 first)."""
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as error:  # noqa: BLE001 (zarr raises many types for a broken store)
        raise InputError(f"{path}: cannot open zarr store ({describe(error)})") from None
    if not hasattr(node, "shape"):
        keys = sorted(node.array_keys())
        if not keys:
            raise InputError(f"{path}: zarr group holds no array")
        node = node[keys[0]]
    return node


def _zarr_stack(path) -> tuple[str, tuple[float, float, float] | None]:
    """:func:`file_stack` of a zarr store: the axes of its first multiscale level (or of the array itself)."""
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
        attrs = dict(node.attrs)
        multiscales = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
        if multiscales:
            axes = [axis["name"] if isinstance(axis, dict) else str(axis) for axis in multiscales[0]["axes"]]
            transforms = multiscales[0]["datasets"][0].get("coordinateTransformations") or []
            scale = next((t["scale"] for t in transforms if t.get("type") == "scale"), None)
        else:
            if not hasattr(node, "shape"):  # a plain group: its first array, as open_image reads it
                node = node[sorted(node.array_keys())[0]]
                attrs = dict(node.attrs)
            axes, scale = attrs.get("_ARRAY_DIMENSIONS") or [], attrs.get("voxel_size")
        letters = "".join(str(axis)[:1].upper() for axis in axes)
        stack = stack_of_axes(letters) if letters[:1] in ("Z", "T") else AUTO
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OSError):
        return AUTO, None
    if stack not in ("z", "tz") or not scale or len(scale) < 3:
        return stack, None
    return stack, tuple(float(v) for v in scale[-3:])


def zarr_axes(stack: str, voxel_size: tuple[float, float, float] | None) -> dict:
    """The attributes a labels zarr array gets so that its axes (and a Z-stack's voxel size) travel with it:
    xarray's ``_ARRAY_DIMENSIONS``, read back by :func:`file_stack`."""
    dimensions = {"z": ["z", "y", "x"], "planes": ["t", "y", "x"], "tz": ["t", "z", "y", "x"]}.get(stack, ["y", "x"])
    return {"_ARRAY_DIMENSIONS": dimensions, **({"voxel_size": list(voxel_size)} if voxel_size else {})}


def _voxel_size(tif) -> tuple[float, float, float] | None:
    """ImageJ's z spacing with the pixel size from the resolution tags, when both are there (in µm when ImageJ's
    unit is a length; else in its unit, which only the z step's ratio to the pixel needs)."""
    spacing = (tif.imagej_metadata or {}).get("spacing")
    pixel = _resolution(tif)
    if not spacing or pixel is None:
        return None
    factor = _UM_PER_UNIT.get(str((tif.imagej_metadata or {}).get("unit", "")).strip().lower(), 1.0)
    return (float(spacing) * factor, pixel[0] * factor, pixel[1] * factor)


# Micrometres per length unit, as ImageJ (and OME's PhysicalSizeXUnit) name them.
_UM_PER_UNIT = {
    "micron": 1.0,
    "microns": 1.0,
    "um": 1.0,
    "\u00b5m": 1.0,  # µm, micro sign
    "\u03bcm": 1.0,  # μm, Greek mu
    "\\u00b5m": 1.0,  # ImageJ's escaped form, as some files hold it
    "nm": 1e-3,
    "mm": 1e3,
    "cm": 1e4,
}


def _resolution(tif) -> tuple[float, float] | None:
    """(y, x) size of a pixel from the TIFF resolution tags, in the file's unit; None without them."""
    page = tif.pages[0]
    tags = [page.tags.get(name) for name in ("YResolution", "XResolution")]
    if any(tag is None or not tag.value[0] for tag in tags):
        return None
    return tags[0].value[1] / tags[0].value[0], tags[1].value[1] / tags[1].value[0]


def file_pixel_size(path) -> float | None:
    """µm per pixel (along x) as a TIFF's metadata states it: ImageJ's calibration in a length unit, or OME's
    PhysicalSizeX; None when the file does not say it in a length (e.g. plain dots per inch)."""
    import re

    import tifffile

    if Path(path).suffix.lower() not in TIFF_READ_SUFFIXES:
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            if tif.ome_metadata:
                match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
                unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
                factor = _UM_PER_UNIT.get(unit.group(1).lower() if unit else "µm")
                return float(match.group(1)) * factor if match and factor else None
            unit = str((tif.imagej_metadata or {}).get("unit", "")).strip().lower()
            pixel = _resolution(tif)
            return pixel[1] * _UM_PER_UNIT[unit] if pixel is not None and unit in _UM_PER_UNIT else None
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError):
        return None
