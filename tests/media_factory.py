"""Real media files for tests: videos encoded with PyAV, images written with Pillow."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image


def frames(count: int, width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth moving gradients (compress well, survive lossy codecs)."""
    y, x = np.mgrid[0:height, 0:width]
    out = []
    for t in range(count):
        r = (x * 255 / max(1, width - 1) + 8 * t + seed * 40) % 256
        g = (y * 255 / max(1, height - 1) + 5 * t) % 256
        b = np.full_like(r, (60 * seed + 10 * t) % 256)
        out.append(np.stack([r, g, b], axis=-1).astype(np.uint8))
    return out


def write_video(
    path: Path,
    count: int,
    width: int,
    height: int,
    codec: str = "libx264",
    fps: int = 24,
    pix_fmt: str = "yuv420p",
    seed: int = 0,
) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for frame in frames(count, width, height, seed):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_gif(path: Path, count: int, width: int, height: int) -> Path:
    images = [Image.fromarray(f) for f in frames(count, width, height, seed=3)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // 24, loop=0)
    return path


def write_image(path: Path, width: int, height: int, seed: int = 0, **save_args) -> Path:
    Image.fromarray(frames(1, width, height, seed)[0]).save(path, **save_args)
    return path


def write_rotated_jpeg(path: Path, width: int, height: int) -> Path:
    """A JPEG stored width x height with EXIF orientation 6 (displayed rotated: height x width)."""
    image = Image.fromarray(frames(1, width, height, seed=5)[0])
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes())
    return path


def write_transparent_png(path: Path, width: int, height: int) -> Path:
    rgba = np.zeros((height, width, 4), dtype=np.uint8)  # fully transparent black
    rgba[: height // 2, :, :] = (200, 0, 0, 255)  # opaque red top half
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def caption(media: Path, text: str, extension: str = ".txt") -> None:
    target = media.with_name(media.name + extension) if media.is_dir() else media.with_suffix(extension)
    target.write_text(text, encoding="utf-8")
