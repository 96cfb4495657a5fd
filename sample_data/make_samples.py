"""Regenerate the files in sample_data/ (deterministic): python sample_data/make_samples.py"""

from pathlib import Path

import tifffile

from napari_nuclei_unet.rle import write_csv
from napari_nuclei_unet.synthetic import sample_field

HERE = Path(__file__).parent

if __name__ == "__main__":
    image, labels = sample_field()
    tifffile.imwrite(HERE / "synthetic_nuclei.tif", image, compression="zlib")
    tifffile.imwrite(HERE / "synthetic_nuclei_labels.tif", labels.astype("uint16"), compression="zlib")
    write_csv(HERE / "synthetic_nuclei_labels.csv", [("synthetic_nuclei", labels)])
    print(f"wrote {image.shape} image with {labels.max()} nuclei to {HERE}")
