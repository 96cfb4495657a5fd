"""Network seconds per megapixel of the bundled model on the CPU, per backend (a benchmark, not a test).

    python benchmarks/backends.py [--side 1024] [--repeats 3] [--no-compile]

Times one forward pass of a ``side`` x ``side`` tile (after a warm-up call) with: eager
PyTorch (channels_last without ``torch.inference_mode``, then contiguous and channels_last
with it), ``torch.compile`` (inductor; its compile time is printed separately), and ONNX
Runtime in float32 and 8-bit (the default), each with 1 thread and with all of torch's
threads, as ``tiling.predict`` runs it. Also prints the largest difference from eager
PyTorch's logits (8-bit logits differ by design: the model card scores them).
"""

from __future__ import annotations

import argparse
import time

import torch

from napari_nuclei_unet.model import Checkpoint, bundled_model_path
from napari_nuclei_unet.onnx_backend import cpu_network


def seconds_per_call(network, tile: torch.Tensor, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        network(tile)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-compile", action="store_true", help="skip torch.compile (it takes ~40 s to compile on 2 cores)"
    )
    args = parser.parse_args()
    threads = torch.get_num_threads()
    model = Checkpoint.load(bundled_model_path()).model.eval()
    tile = torch.randn(1, 3, args.side, args.side)
    megapixels = args.side * args.side / 1e6
    last = model.to(memory_format=torch.channels_last)
    tile_last = tile.contiguous(memory_format=torch.channels_last)
    last(tile_last)
    without = seconds_per_call(last, tile_last, args.repeats) / megapixels  # autograd records every operation
    print(f"{'eager, channels_last, no inference_mode':<40} {without:.3f} s/MP", flush=True)
    model = model.to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        reference = model(tile)
        rows = []

        def measure(name, network, tile):
            network(tile)  # warm-up: the first call at a shape is slower
            difference = float((network(tile) - reference).abs().max())
            rows.append((name, seconds_per_call(network, tile, args.repeats) / megapixels, difference))
            print(f"{name:<40} {rows[-1][1]:.3f} s/MP   max |logit difference| {difference:.1e}", flush=True)

        measure(f"eager, contiguous, {threads} threads", model, tile)
        last = model.to(memory_format=torch.channels_last)
        measure(f"eager, channels_last, {threads} threads", last, tile_last)
        if not args.no_compile:
            started = time.perf_counter()
            compiled = torch.compile(last)
            compiled(tile.contiguous(memory_format=torch.channels_last))
            print(f"torch.compile: {time.perf_counter() - started:.0f} s to compile", flush=True)
            measure(
                f"torch.compile, channels_last, {threads} threads",
                compiled,
                tile.contiguous(memory_format=torch.channels_last),
            )
        model = model.to(memory_format=torch.contiguous_format)
        for precision in ("float32", "int8"):
            for count in sorted({1, threads}):
                torch.set_num_threads(count)
                network = cpu_network(model, 3, "onnx", precision)
                measure(f"ONNX Runtime {precision}, {count} thread{'s' if count > 1 else ''}", network, tile)
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
