"""Speed reference: the bioimage.io Model Zoo's "UNet 2D Nuclei Broad" with a plain watershed, as a whole process.

    python benchmarks/zoo_reference.py IMAGES... --out FOLDER [--threads 2]

The bar for ``nuclei-unet segment`` (issue "Model v2") is to be no slower than a small
foreground-only U-Net from the Model Zoo run the simplest sensible way. This script is that
way, timed as a user waits for it (run it under ``/usr/bin/time``): read each image, make it
grey, normalise it to zero mean and unit variance (the package's preprocessing), run the
package's ONNX weights under ONNX Runtime on the whole image (reflect-padded to a multiple of 16;
the package declares a fixed 512 x 512 input, but the network is fully convolutional, so its
height and width are freed here: tiling small images into 512 x 512 would make it ~4x slower),
threshold the sigmoid at 0.5, split touching nuclei with a distance-transform watershed from
its local maxima, and write a label TIFF. It imports no torch. The model is read from
``../shared/models/unet2d_nuclei_broad`` (MIT licence); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO.parent / "shared" / "models" / "unet2d_nuclei_broad"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--package", default=str(PACKAGE))
    parser.add_argument(
        "--weights",
        default="onnx",
        choices=["onnx", "torchscript"],
        help="the package's ONNX (no torch imported) or TorchScript weights",
    )
    args = parser.parse_args()

    import onnxruntime
    import tifffile
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.io import imread
    from skimage.segmentation import watershed

    started = time.perf_counter()
    if args.weights == "onnx":
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = onnxruntime.InferenceSession(
            any_size(Path(args.package) / "weights.onnx"), options, providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name

        def network(grey: np.ndarray) -> np.ndarray:
            height, width = grey.shape
            padded = np.pad(grey, ((0, -height % 16), (0, -width % 16)), mode="reflect")
            return session.run(None, {name: np.ascontiguousarray(padded)[None, None]})[0][0, 0, :height, :width]
    else:
        import torch

        torch.set_num_threads(args.threads)
        scripted = torch.jit.load(str(Path(args.package) / "weights.pt"), map_location="cpu").eval()

        def network(grey: np.ndarray) -> np.ndarray:
            height, width = grey.shape
            padded = np.pad(grey, ((0, -height % 16), (0, -width % 16)), mode="reflect")
            with torch.inference_mode():
                return scripted(torch.from_numpy(np.ascontiguousarray(padded))[None, None]).numpy()[
                    0, 0, :height, :width
                ]

    files = [
        Path(f)
        for item in args.inputs
        for f in (sorted(glob.glob(str(Path(item) / "*.png"))) if Path(item).is_dir() else [item])
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pixels = nuclei = 0
    for path in files:
        image = np.asarray(imread(path), np.float32)
        grey = image[..., :3].mean(-1) if image.ndim == 3 else image
        grey = (grey - grey.mean()) / max(float(grey.std()), 1e-6)
        height, width = grey.shape
        output = network(grey)
        mask = 1.0 / (1.0 + np.exp(-output)) > 0.5
        distance = ndi.distance_transform_edt(mask)
        peaks = peak_local_max(distance, min_distance=3, labels=ndi.label(mask)[0], exclude_border=False)
        markers = np.zeros(mask.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        labels = watershed(-distance, markers, mask=mask)
        tifffile.imwrite(out / f"{path.stem}.tif", labels.astype(np.uint16), compression="zlib")
        pixels += height * width
        nuclei += len(peaks)
    seconds = time.perf_counter() - started
    print(
        f"{len(files)} images, {pixels / 1e6:.1f} MP, {nuclei} nuclei in {seconds:.1f} s after imports "
        f"({pixels / 1e6 / seconds:.2f} MP/s)"
    )


def any_size(path: Path) -> bytes:
    """The ONNX graph with free height and width (the package fixes them at 512)."""
    import onnx

    graph = onnx.load(str(path))
    for tensor in (*graph.graph.input, *graph.graph.output):
        dims = tensor.type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "height", "width"
    del graph.graph.value_info[:]  # inferred shapes of the fixed size
    return graph.SerializeToString()


if __name__ == "__main__":
    main()
