"""Whether the weight files a command needs exist, checked before any model code is imported: one message
names every missing path (those the user gave, and the defaults that were used), with where to get them."""

from __future__ import annotations

import argparse
from pathlib import Path


class WeightsMissing(ValueError):
    pass


def missing_weights(paths: dict[str, str], given: set[str]) -> list[str]:
    """Each path of ``paths`` (option name -> path) that does not exist, as the user gave it or as a default."""
    return [
        f"--{name} {path}" if name in given else f"{path} (the default of --{name}, which was not given)"
        for name, path in paths.items()
        if not Path(path).exists()
    ]


def check_paths(paths: dict[str, str], given: set[str], task_name: str, extra: list[str] | None = None) -> None:
    """A WeightsMissing naming every missing path of ``paths`` (and the ``extra`` ones already found missing)."""
    missing = missing_weights(paths, given) + list(extra or [])
    if missing:
        raise WeightsMissing(
            f"{'; '.join(missing)} {'does' if len(missing) == 1 else 'do'} not exist. The layout of the weights is in "
            f"docs/weights.md; python -m kandinsky5.download --task {task_name} fetches the task's files"
        )


def check_weights(args: argparse.Namespace, task) -> None:
    """Every weight path a generation needs, checked at once: one message names all that are missing."""
    names = ("vae",) if args.latent_path else ("dit", "vae", "text_encoder_qwen", "text_encoder_clip")
    loras = [f"--lora_weight {path}" for path in args.lora_weight or [] if not Path(path).exists()]
    check_paths({name: getattr(args, name) for name in names}, args.given_paths, task.name, loras)
