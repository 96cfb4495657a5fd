"""Segment cell nuclei with a tiled U-Net and a watershed; headless core plus a napari plugin.

The core modules (params, io, rle, model, tiling, postprocess, scale, plane, blocks, segment, batch,
training, metrics) import
neither Qt nor napari, so they run in the CLI, notebooks and dask workers.
"""

__version__ = "0.1.0"

from .errors import Cancelled, InputError, ModelError, NucleiUnetError, RLEError

__all__ = ["Cancelled", "InputError", "ModelError", "NucleiUnetError", "RLEError", "__version__"]
