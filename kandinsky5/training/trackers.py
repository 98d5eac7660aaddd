"""Where training's figures and samples go: tensorboard, Weights & Biases, or both, through
accelerate's trackers (started on the main process only).

Scalars (loss, learning rate, validation loss) go to every tracker through ``accelerator.log``.
Samples go to each tracker in its own form: tensorboard gets the first frame as an image, wandb an
image, or for a video the video file itself.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from accelerate import Accelerator

TRACKERS = ("tensorboard", "wandb")
CHOICES = (*TRACKERS, "all")


class TrackerError(ValueError):
    pass


def chosen_trackers(args: argparse.Namespace) -> list[str]:
    """The trackers asked for: --log_with, or tensorboard when only --logging_dir is given."""
    chosen = args.log_with or ("tensorboard" if args.logging_dir else None)
    if chosen is None:
        return []
    names = list(TRACKERS) if chosen == "all" else [chosen]
    if "tensorboard" in names and not args.logging_dir:
        raise TrackerError(f"--log_with {chosen} writes tensorboard logs: give them a folder with --logging_dir")
    if "wandb" in names:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise TrackerError(f"--log_with {chosen} needs the wandb package: pip install wandb") from None
    return names


def wandb_folder(args: argparse.Namespace) -> Path:
    """wandb's local files go under the logging folder, else the output folder: nowhere the user did not name."""
    return Path(args.logging_dir or args.output_dir)


def _tracker_config(args: argparse.Namespace) -> dict:
    """--log_tracker_config: a TOML file of init keywords per tracker ([wandb] entity = ..., tags = [...])."""
    if not args.log_tracker_config:
        return {}
    import toml

    try:
        values = toml.loads(Path(args.log_tracker_config).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, toml.TomlDecodeError) as error:
        raise TrackerError(f"--log_tracker_config {args.log_tracker_config} cannot be read: {error}") from None
    if not all(isinstance(v, dict) for v in values.values()):
        raise TrackerError(f"--log_tracker_config {args.log_tracker_config}: expected tables such as [wandb]")
    return values


def run_config(args: argparse.Namespace) -> dict:
    """--log_config: every option of the run that a tracker can hold (numbers, text, flags)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool) and "token" not in k
            and "api_key" not in k}  # fmt: skip


def start_trackers(accelerator: Accelerator, names: list[str], args: argparse.Namespace, config: dict) -> None:
    if not names:
        return
    init = _tracker_config(args)
    if getattr(args, "log_config", False):
        config = {**run_config(args), **config}
    if "wandb" in names:
        if args.wandb_api_key:
            os.environ["WANDB_API_KEY"] = args.wandb_api_key
        folder = wandb_folder(args)
        folder.mkdir(parents=True, exist_ok=True)
        for variable in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # not the home folder, unless the user says so
            os.environ.setdefault(variable, str(folder / "wandb" / "local"))
        init["wandb"] = {"name": args.wandb_run_name, "dir": str(folder), **init.get("wandb", {})}
    name = f"{getattr(args, 'log_prefix', None) or ''}{args.log_tracker_name}"
    accelerator.init_trackers(name, config=config, init_kwargs=init)


class SampleLog:
    """Logs one sample (its file and its first frame) to each tracker."""

    def __init__(self, accelerator: Accelerator, names: list[str]):
        self.tensorboard = accelerator.get_tracker("tensorboard", unwrap=True) if "tensorboard" in names else None
        self.wandb = accelerator.get_tracker("wandb", unwrap=True) if "wandb" in names else None

    def __call__(self, tag: str, path: Path, first_frame: torch.Tensor, step: int, video: bool) -> None:
        """``first_frame``: (3, H, W) uint8."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, first_frame, step)
        if self.wandb is not None:
            import wandb

            media = wandb.Video(str(path), format="mp4") if video else wandb.Image(first_frame.permute(1, 2, 0).numpy())
            self.wandb.log({tag: media}, step=step)
