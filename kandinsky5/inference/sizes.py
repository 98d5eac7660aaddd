"""Frame counts and frame sizes: what is valid for a task, and the defaults the official code picks."""

from __future__ import annotations

import math

from kandinsky5.model.tasks import TaskPreset

# Sizes (height, width) the official pipelines allow, per resolution class.
ALLOWED_SIZES = {
    512: [(512, 512), (512, 768), (768, 512)],
    1024: [(1024, 1024), (640, 1408), (1408, 640), (768, 1280), (1280, 768), (896, 1152), (1152, 896)],
}


class SizeError(ValueError):
    pass


def check_frames(frames: int) -> None:
    if frames < 1 or (frames - 1) % 4:
        low = max(1, (frames - 1) // 4 * 4 + 1)
        raise SizeError(f"frames must be 4k+1 (1, 5, 9, ..., 121 for 5 s), got {frames}; nearest: {low} or {low + 4}")


def check_size(width: int, height: int, task: TaskPreset, multiple: int | None = None) -> None:
    m = multiple or task.size_multiple
    for name, value in (("width", width), ("height", height)):
        if value < m or value % m:
            low = max(m, value // m * m)
            why = " (NABLA attention works on 128-pixel tiles)" if m == 128 else ""
            raise SizeError(
                f"{name} must be a multiple of {m} for task {task.name}{why}, got {value}; nearest: {low} or {low + m}"
            )


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def i2v_size(image_width: int, image_height: int, task: TaskPreset) -> tuple[int, int]:
    """(width, height) of an I2V video made from an image: the image's aspect ratio at the task's
    pixel budget (512 x 768 for 512-class tasks), sides rounded to the task's multiple (as official)."""
    area = 512 * 768 if task.resolution == 512 else task.resolution**2
    k = math.sqrt(area / (image_width * image_height))
    m = task.size_multiple
    return _round_to(image_width * k, m), _round_to(image_height * k, m)


def allowed_sizes(task: TaskPreset) -> list[tuple[int, int]]:
    """(height, width) pairs of the task's resolution class (the 1024 list scaled for other classes)."""
    if task.resolution in ALLOWED_SIZES:
        return ALLOWED_SIZES[task.resolution]
    scale, m = task.resolution / 1024, task.size_multiple
    return list(dict.fromkeys((_round_to(h * scale, m), _round_to(w * scale, m)) for h, w in ALLOWED_SIZES[1024]))


def nearest_allowed_size(image_width: int, image_height: int, task: TaskPreset) -> tuple[int, int]:
    """(width, height) of the allowed size whose aspect ratio is closest to the image's (I2I)."""
    ratio = image_width / image_height
    h, w = min(allowed_sizes(task), key=lambda hw: abs(math.log((hw[1] / hw[0]) / ratio)))
    return w, h
