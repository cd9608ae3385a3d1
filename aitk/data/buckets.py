"""Aspect-ratio buckets. Images are only ever downscaled and cropped, never upscaled.

For a resolution R the buckets are the sizes (w, h), both multiples of `divisibility`, with
w * h <= R * R that cannot grow on either side without exceeding R * R (the Pareto frontier), with
aspect ratios up to MAX_ASPECT. An image gets the bucket of closest aspect ratio among those that
fit inside it; an image smaller than every bucket gets its own bucket (its own aspect, floored to
multiples of `divisibility`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

MAX_ASPECT = 4.0


@lru_cache(maxsize=64)
def bucket_sizes(resolution: int, divisibility: int) -> tuple[tuple[int, int], ...]:
    """The standard buckets of one resolution (about resolution**2 pixels), sorted by width."""
    if int(divisibility) > 0 and resolution < divisibility:
        raise ValueError(f"resolution {resolution} is smaller than the bucket divisibility {divisibility}")
    return budget_buckets(int(resolution) * int(resolution), divisibility)


def budget_buckets(max_pixels: int, divisibility: int) -> tuple[tuple[int, int], ...]:
    """The aspect buckets of a pixel budget: sizes (w, h), multiples of `divisibility`, w*h <=
    max_pixels, aspect up to MAX_ASPECT, that cannot grow on either side within the budget."""
    d, area = int(divisibility), int(max_pixels)
    if d <= 0:
        raise ValueError(f"divisibility must be positive, got {divisibility}")
    if area < d * d:
        raise ValueError(f"max_pixels {max_pixels} is smaller than one {d}x{d} block")
    candidates = []
    w = d
    while True:
        h = (area // w) // d * d
        if h < d:
            break
        if max(w, h) / min(w, h) <= MAX_ASPECT:
            candidates.append((w, h))
        w += d
    frontier = [
        (w, h)
        for (w, h) in candidates
        if not any(w2 >= w and h2 >= h and (w2, h2) != (w, h) for (w2, h2) in candidates)
    ]
    return tuple(sorted(set(frontier)))


def choose_bucket(
    img_w: int, img_h: int, resolution: int, divisibility: int, use_buckets: bool = True
) -> tuple[int, int] | None:
    """The (width, height) an image is trained at for one resolution, or None if it is too small.

    The result always fits inside the image (no upscaling).
    """
    d = int(divisibility)
    if img_w < d or img_h < d:
        return None
    if not use_buckets:
        side = min(resolution // d * d, min(img_w, img_h) // d * d)
        side = max(side, d)
        return (side, side)
    fits = [(w, h) for (w, h) in bucket_sizes(resolution, d) if w <= img_w and h <= img_h]
    if fits:
        target = math.log(img_w / img_h)
        return min(fits, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1], b[0]))
    # Smaller than every bucket: own bucket at its own aspect, at most R*R pixels.
    scale = min(1.0, math.sqrt(resolution * resolution / (img_w * img_h)))
    w = max(d, int(img_w * scale) // d * d)
    h = max(d, int(img_h * scale) // d * d)
    return (min(w, img_w // d * d), min(h, img_h // d * d))


@dataclass(frozen=True)
class CropGeometry:
    """How an image of a given size becomes a bucket: resize to `scaled`, then crop `box`."""

    scaled: tuple[int, int]
    box: tuple[int, int, int, int]  # left, top, right, bottom in the scaled image


def scaled_size(img_w: int, img_h: int, bucket_w: int, bucket_h: int) -> tuple[int, int]:
    """The size the image is resized to so that it covers the bucket (never larger than the image)."""
    if bucket_w > img_w or bucket_h > img_h:
        raise ValueError(f"bucket {bucket_w}x{bucket_h} does not fit inside image {img_w}x{img_h}")
    s = max(bucket_w / img_w, bucket_h / img_h)
    sw = min(img_w, max(bucket_w, round(img_w * s)))
    sh = min(img_h, max(bucket_h, round(img_h * s)))
    return sw, sh


def crop_geometry(
    img_w: int,
    img_h: int,
    bucket_w: int,
    bucket_h: int,
    u: tuple[float, float] | None = None,
) -> CropGeometry:
    """Centre crop when `u` is None; otherwise `u` (two floats in [0, 1)) places a random crop."""
    sw, sh = scaled_size(img_w, img_h, bucket_w, bucket_h)
    free_x, free_y = sw - bucket_w, sh - bucket_h
    if u is None:
        left, top = free_x // 2, free_y // 2
    else:
        left = min(free_x, int(u[0] * (free_x + 1)))
        top = min(free_y, int(u[1] * (free_y + 1)))
    return CropGeometry((sw, sh), (left, top, left + bucket_w, top + bucket_h))
