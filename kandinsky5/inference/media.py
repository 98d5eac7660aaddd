"""Reading images and writing videos and images, with generation metadata."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from modules.atomic_save import atomic_path
from modules.images import eight_bit_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov")
METADATA_KEY = "kandinsky5"
VIDEO_CRF = 12  # H.264 quality: 0 lossless, 23 x264's default


class MediaError(ValueError):
    pass


def load_image(path: str | Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied, high bit depths scaled to 8 bits and any
    transparency composited on white."""
    try:
        image = ImageOps.exif_transpose(Image.open(path))
        image.load()
    except Exception as error:
        raise MediaError(f"cannot read image {path}: {error}") from None
    return eight_bit_rgb(image)


def resize_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width x height keeping the aspect ratio, then crop the centre."""
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def image_to_pixels(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1, 3, 1, H, W) float in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return (array.permute(2, 0, 1).float() / 127.5 - 1.0)[None, :, None]


def pixels_to_frames(pixels: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    frames = ((pixels.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def write_video(path: str | Path, frames: np.ndarray, fps: float, metadata: dict) -> None:
    """H.264 (yuv420p) video of (F, H, W, 3) uint8 frames; metadata as JSON in the container comment."""
    import av

    with atomic_path(path) as tmp, av.open(str(tmp), mode="w") as container:
        container.metadata["comment"] = json.dumps({METADATA_KEY: metadata})
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(VIDEO_CRF)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_image(path: str | Path, frame: np.ndarray, metadata: dict) -> None:
    """One (H, W, 3) uint8 frame; PNG files carry the metadata as a text chunk."""
    with atomic_path(path) as tmp:
        image = Image.fromarray(frame)
        if tmp.suffix.lower() == ".png":
            info = PngInfo()
            info.add_text(METADATA_KEY, json.dumps(metadata))
            image.save(tmp, format="PNG", pnginfo=info)
        else:
            image.save(tmp, quality=95)


def read_metadata(path: str | Path) -> dict:
    """The generation metadata written with an output file."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        return json.loads(Image.open(path).text[METADATA_KEY])
    import av

    with av.open(str(path)) as container:
        return json.loads(container.metadata["comment"])[METADATA_KEY]
