"""Images and videos as Qwen2.5-VL takes them, without torchvision (which its video processor needs).

A frame is resized so both sides are multiples of 28 (14-pixel patches merged 2 x 2) with its pixel
count within bounds (``smart_resize``, the rule of Qwen2-VL's processors), scaled to [0, 1],
normalized with CLIP's mean and deviation and cut into 14 x 14 patches. A video is sampled at
``fps`` frames per second (at least ``min_frames``, at most ``max_frames``, an even count), and each
two consecutive frames make one temporal patch: ``video_grid_thw`` = (frames / 2, h / 14, w / 14),
and ``second_per_grid_ts`` = 2 / fps tells the model the time between temporal patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

PATCH, MERGE, TEMPORAL = 14, 2, 2
FACTOR = PATCH * MERGE
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass(frozen=True)
class VideoSampling:
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 32
    max_pixels: int = 360 * 420  # per frame
    min_pixels: int = 128 * 28 * 28 // 4


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor``, scaled into [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"a frame of {width}x{height} is too narrow for Qwen2.5-VL (aspect ratio above 200)")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def bounded_image(image: Image.Image, max_pixels: int) -> Image.Image:
    """The image scaled down (aspect kept) to at most ``max_pixels``; the image processor does the rest."""
    image = image.convert("RGB")
    if image.width * image.height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (image.width * image.height))
    return image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.BICUBIC)


def sampled_indices(count: int, source_fps: float, sampling: VideoSampling) -> list[int]:
    """Which of ``count`` frames (at ``source_fps``) Qwen sees: ``sampling.fps`` per second, evenly
    spread, an even number between min_frames and max_frames (never more than there are, but at least 2)."""
    wanted = round(count / source_fps * sampling.fps)
    wanted = min(max(wanted, sampling.min_frames), sampling.max_frames, count - count % TEMPORAL or TEMPORAL)
    wanted = max(TEMPORAL, wanted - wanted % TEMPORAL)
    return np.linspace(0, count - 1, wanted).round().astype(int).tolist()


def video_inputs(frames: list[Image.Image], source_fps: float, sampling: VideoSampling) -> dict[str, torch.Tensor]:
    """pixel_values_videos (patches, 3 * 2 * 14 * 14), video_grid_thw (1, 3) and second_per_grid_ts (1,)."""
    indices = sampled_indices(len(frames), source_fps, sampling)
    first = frames[indices[0]]
    height, width = smart_resize(first.height, first.width, sampling.min_pixels, sampling.max_pixels)
    pixels = np.stack([
        (np.asarray(frames[i].convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float32) / 255.0 - MEAN)
        / STD for i in indices
    ]).transpose(0, 3, 1, 2)  # (T, C, H, W)  # fmt: skip
    t, h, w = len(indices) // TEMPORAL, height // PATCH, width // PATCH
    patches = pixels.reshape(t, TEMPORAL, 3, h // MERGE, MERGE, PATCH, w // MERGE, MERGE, PATCH)
    # (t, h-blocks, w-blocks, merge rows, merge cols, C, temporal, patch rows, patch cols): Qwen2-VL's order
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, 3 * TEMPORAL * PATCH * PATCH)
    sampled_fps = len(indices) * source_fps / len(frames)  # the sampled frames' rate over the clip
    return {
        "pixel_values_videos": torch.from_numpy(np.ascontiguousarray(patches)),
        "video_grid_thw": torch.tensor([[t, h, w]]),
        "second_per_grid_ts": torch.tensor([TEMPORAL / sampled_fps]),
    }
