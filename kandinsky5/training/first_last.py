"""First+last-frame I2V training (``--i2v_mode first_last``): the clip's last frame, cached alone as
generation encodes ``--image_last``, goes into the conditioning channels of the last latent frame with
its mask, as generation puts it there; the first frame keeps the official I2V convention. With
``--first_last_probability`` below 1 each sample gets its last frame with that probability, so one
LoRA learns both the first-only and the first+last mode.
"""

from __future__ import annotations

import torch
from safetensors import safe_open

from kandinsky5.inference.denoiser import with_last_frame
from kandinsky5.model.tasks import TaskPreset


class FirstLastError(ValueError):
    pass


def check_last_frames(datasets, task: TaskPreset, config: str) -> None:
    """Every clip's cache holds its last frame; caches written before last frames were cached are named."""
    if task.kind != "i2v":
        raise FirstLastError(f"--i2v_mode first_last is for image-to-video tasks; {task.name} is {task.kind}")
    lacking = []
    for entry in datasets:
        for sample in entry.samples:
            if sample.shape[0] < 2:
                continue  # an image (or a one-latent-frame clip) has no last frame apart from its first
            with safe_open(str(sample.latent_file), framework="pt") as f:
                if "last_frame" not in f.keys():
                    lacking.append(sample.latent_file)
    if lacking:
        raise FirstLastError(
            f"{len(lacking)} latent cache(s) hold no last frame, such as {lacking[0]} (written before last frames "
            f"were cached): run kandinsky5_cache_latents.py --dataset_config {config} --task {task.name} again, "
            "which rewrites them with it"
        )


def last_frame_conditioning(
    channels: torch.Tensor, last_frame: torch.Tensor, probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``channels`` (B, T, H, W, 17) with each sample's last frame (B, 1, H, W, 16) given, with ``probability``
    (drawn per sample on the CPU from ``generator``, or the global random state; nothing is drawn at 1)."""
    if probability >= 1.0:
        return with_last_frame(channels, last_frame)
    chosen = torch.rand(channels.shape[0], generator=generator) < probability
    given = with_last_frame(channels, last_frame)
    return torch.where(chosen.to(channels.device)[:, None, None, None, None], given, channels)
