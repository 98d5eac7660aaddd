"""Reading video frames and cutting clips out of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from modules.images import eight_bit_rgb

from .config import DatasetConfig
from .sources import IMAGE_EXTENSIONS

MODEL_FPS = 24.0


class VideoReadError(ValueError):
    pass


def _source_indices(count: int, source_fps: float | None, limit: int | None) -> list[int]:
    """Which source frames make the 24 fps sequence: every frame, or one per 1/24 s of source time."""
    if source_fps is None:
        indices = list(range(count))
    else:
        step = source_fps / MODEL_FPS
        indices = [int(j * step + 1e-6) for j in range(int((count - 1) / step + 1e-6) + 1)]
    return indices[:limit] if limit is not None else indices


def read_frames(path: Path, source_fps: float | None = None, limit: int | None = None) -> list[Image.Image]:
    """RGB frames of a video file or a folder of images, resampled to 24 fps when ``source_fps`` is set;
    at most ``limit`` frames (decoding stops there)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        indices = _source_indices(len(files), source_fps, limit)
        try:
            return [eight_bit_rgb(ImageOps.exif_transpose(Image.open(files[i]))) for i in indices]
        except Exception as error:  # Pillow raises several error types for damaged files
            raise VideoReadError(f"cannot read a frame of {path}: {error}") from None
    import av

    wanted = None if limit is None else (limit if source_fps is None else int(limit * source_fps / MODEL_FPS) + 2)
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path} has no video stream (only {len(container.streams)} other streams)")
            for frame in container.decode(video=0):
                frames.append(frame.to_image().convert("RGB"))
                if wanted is not None and len(frames) >= wanted:
                    break
    except VideoReadError:
        raise
    except Exception as error:  # PyAV raises several error types for damaged files
        raise VideoReadError(f"cannot decode {path}: {error}") from None
    if not frames:
        raise VideoReadError(f"{path} has no decodable video frames")
    return [frames[i] for i in _source_indices(len(frames), source_fps, limit)]


def frames_needed(dataset: DatasetConfig) -> int | None:
    """How many frames to decode: only the head's for ``head``, all for the other modes."""
    return max(dataset.target_frames) if dataset.frame_extraction == "head" else None


def clips(frame_count: int, dataset: DatasetConfig) -> list[tuple[int, int]]:
    """(start, length) of every clip the extraction mode cuts from ``frame_count`` frames."""
    mode, result = dataset.frame_extraction, []
    if mode == "full":
        length = (min(frame_count, dataset.max_frames) - 1) // 4 * 4 + 1
        return [(0, length)]
    for length in dataset.target_frames:
        if length > frame_count:
            continue
        if mode == "head":
            result.append((0, length))
        elif mode == "chunk":
            result += [(start, length) for start in range(0, frame_count - length + 1, length)]
        elif mode == "slide":
            result += [(start, length) for start in range(0, frame_count - length + 1, dataset.frame_stride)]
        elif mode == "uniform":
            starts = np.linspace(0, frame_count - length, dataset.frame_sample).astype(int)
            result += [(int(start), length) for start in dict.fromkeys(starts.tolist())]
    return result
