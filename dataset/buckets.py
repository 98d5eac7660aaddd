"""Aspect-ratio buckets: frame sizes of about the same area as the configured resolution."""

from __future__ import annotations

import math


def floor_to(value: int, step: int) -> int:
    return value - value % step


def bucket_sizes(resolution: tuple[int, int], step: int = 16) -> list[tuple[int, int]]:
    """(width, height) pairs, sides multiples of ``step``, area at most resolution's, from tall to wide."""
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area))
    sizes = set()
    for width in range(max(step, floor_to(side // 2, step)), side + step, step):
        height = floor_to(area // width, step)
        if height >= step:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes, key=lambda wh: wh[0] / wh[1])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (compared on a log scale)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda wh: abs(math.log(wh[0] / wh[1]) - ratio))


def choose_bucket(
    width: int, height: int, resolution: tuple[int, int], enable_bucket: bool, no_upscale: bool, step: int = 16
) -> tuple[int, int]:
    """The frame size an image or video of width x height is resized and cropped to."""
    if not enable_bucket:
        return (max(step, floor_to(resolution[0], step)), max(step, floor_to(resolution[1], step)))
    if no_upscale and width * height <= resolution[0] * resolution[1]:
        return (max(step, floor_to(width, step)), max(step, floor_to(height, step)))
    return nearest_bucket(width, height, bucket_sizes(resolution, step))
