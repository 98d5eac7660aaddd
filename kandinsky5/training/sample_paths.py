"""The files that samples during training need (the text encoders and the VAE), checked before any model
code is imported."""

from __future__ import annotations

import argparse

from kandinsky5.inference.weight_paths import missing_weights
from kandinsky5.model.tasks import TaskPreset, default_paths


class SamplePathError(ValueError):
    pass


def sample_paths(args: argparse.Namespace, task: TaskPreset) -> dict[str, str]:
    """The text encoders and VAE that samples need: the options given, else the task's defaults."""
    defaults = default_paths(task)
    return {name: getattr(args, name) or defaults[name] for name in ("text_encoder_qwen", "text_encoder_clip", "vae")}


def check_sample_paths(args: argparse.Namespace, task: TaskPreset) -> None:
    """Before anything loads: every path that --sample_prompts needs exists (all missing ones named at once,
    a default as one)."""
    given = {name for name in ("text_encoder_qwen", "text_encoder_clip", "vae") if getattr(args, name) is not None}
    missing = missing_weights(sample_paths(args, task), given)
    if missing:
        raise SamplePathError(
            "--sample_prompts needs the text encoders and the VAE: "
            + "; ".join(f"{where} does not exist" for where in missing)
        )
