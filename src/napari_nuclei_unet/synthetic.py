"""A deterministic generator of fluorescence-like nuclei fields with known ground truth.

Used for the sample data, tests and benchmarks: ellipses (some placed to touch), a
nucleus texture, blur, background and shot noise, as 16-bit images.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def nuclei_field(
    shape: tuple[int, int] = (256, 256),
    count: int = 30,
    diameter: float = 18.0,
    touching_fraction: float = 0.4,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint16, labels int32)``: ``count`` nuclei of about ``diameter`` px, a fraction in touching pairs."""
    rng = np.random.default_rng(seed)
    height, width = shape
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[:height, :width]
    centres: list[tuple[float, float, float, float, float]] = []
    attempts = 0
    while len(centres) < count and attempts < count * 200:
        attempts += 1
        radius_a = diameter / 2 * rng.uniform(0.8, 1.2)
        radius_b = radius_a * rng.uniform(0.7, 1.0)
        angle = rng.uniform(0, np.pi)
        if centres and rng.random() < touching_fraction:  # place next to an existing nucleus so they touch
            cy, cx, ra, _, _ = centres[rng.integers(len(centres))]
            direction = rng.uniform(0, 2 * np.pi)
            distance = (ra + radius_a) * 0.85
            y, x = cy + distance * np.sin(direction), cx + distance * np.cos(direction)
        else:
            y, x = rng.uniform(radius_a, height - radius_a), rng.uniform(radius_a, width - radius_a)
        if not (radius_a <= y < height - radius_a and radius_a <= x < width - radius_a):
            continue
        cos, sin = np.cos(angle), np.sin(angle)
        dy, dx = yy - y, xx - x
        inside = ((dx * cos + dy * sin) / radius_a) ** 2 + ((-dx * sin + dy * cos) / radius_b) ** 2 <= 1
        free = inside & (labels == 0)
        if free.sum() < 0.8 * inside.sum():  # would hide too much of another nucleus
            continue
        labels[free] = len(centres) + 1
        centres.append((y, x, radius_a, radius_b, angle))
    brightness = np.concatenate([[0.0], rng.uniform(0.5, 1.0, len(centres))])
    texture = ndi.gaussian_filter(rng.random(shape), 1.5)
    signal = brightness[labels] * (0.8 + 0.4 * (texture - texture.mean()) / (texture.std() + 1e-9) * 0.25)
    signal = ndi.gaussian_filter(signal, 1.0)
    background = 0.05 + 0.03 * ndi.gaussian_filter(rng.random(shape), 30) / 0.5
    expected = (background + signal) * 3000.0
    image = rng.poisson(np.clip(expected, 0, None)).astype(np.float64) + rng.normal(0, 20, shape)
    return np.clip(image, 0, 65535).astype(np.uint16), labels


def sample_field() -> tuple[np.ndarray, np.ndarray]:
    """The plugin's generated sample (also written to sample_data/ by its script): 60 nuclei, ~20 px."""
    return nuclei_field((384, 512), count=60, diameter=20, seed=2018)


def nuclei_volume(
    shape: tuple[int, int, int] = (24, 192, 256),
    count: int = 40,
    diameter: float = 20.0,
    z_step: float = 2.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(image uint16, labels int32)`` of a Z-stack: ``count`` ellipsoidal nuclei of about ``diameter`` px across
    in xy, sampled every ``z_step`` px in z (an anisotropic confocal stack), some touching, blurred more in z."""
    rng = np.random.default_rng(seed)
    depth, height, width = shape
    labels = np.zeros(shape, np.int32)
    placed: list[tuple[float, float, float, float]] = []
    for _ in range(count * 50):
        if len(placed) == count:
            break
        radius = diameter / 2 * rng.uniform(0.8, 1.2)
        if placed and rng.random() < 0.4:  # next to an existing nucleus, touching it
            cz, cy, cx, other = placed[rng.integers(len(placed))]
            direction = rng.normal(size=3) * (0.4, 1.0, 1.0)
            z, y, x = np.array([cz, cy, cx]) + direction / np.linalg.norm(direction) * (other + radius) * 0.85
        else:
            z, y, x = rng.uniform(radius, depth * z_step - radius), rng.uniform(0, height), rng.uniform(0, width)
        if not (
            radius <= z <= depth * z_step - radius and radius <= y < height - radius and radius <= x < width - radius
        ):
            continue
        box = tuple(  # the nucleus's bounding box, in voxels
            slice(max(0, int(c - radius) - 1), min(n, int(c + radius) + 2))
            for c, n in ((z / z_step, depth), (y, height), (x, width))
        )
        zz, yy, xx = np.ogrid[box]
        squash = rng.uniform(0.8, 1.0)
        inside = ((zz * z_step - z) / 0.85) ** 2 + (yy - y) ** 2 + ((xx - x) / squash) ** 2 <= radius**2
        region = labels[box]
        free = inside & (region == 0)
        if free.sum() < 0.8 * inside.sum():
            continue
        region[free] = len(placed) + 1
        placed.append((z, y, x, radius))
    brightness = np.concatenate([[0.0], rng.uniform(0.5, 1.0, len(placed))])
    signal = ndi.gaussian_filter(brightness[labels], (1.5 / z_step, 1.0, 1.0))
    background = 0.05 + 0.03 * ndi.gaussian_filter(rng.random(shape), (2, 30, 30)) / 0.5
    image = rng.poisson(np.clip((background + signal) * 3000.0, 0, None)) + rng.normal(0, 20, shape)
    return np.clip(image, 0, 65535).astype(np.uint16), labels
