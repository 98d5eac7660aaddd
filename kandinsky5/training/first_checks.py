"""Training's first checks, which need no model code: the script runs them before it imports training's
code (seconds of start-up), and preflight() starts with them, so a run and the web UI give one message."""

from __future__ import annotations

import argparse
from pathlib import Path

from kandinsky5.model.attention import attention_backend, check_backend
from kandinsky5.model.checkpoint import checkpoint_files
from kandinsky5.training.fsdp_options import check_fsdp_options, fsdp_settings
from kandinsky5.training.sample_paths import check_sample_paths
from modules.output_paths import check_writable_folder, plain_name


def first_checks(args: argparse.Namespace) -> list[Path]:
    """The attention package, the FSDP refusals, the output name and folders, the samples' files and the
    DiT's files, in that order (a ValueError names the first problem); returns the DiT's files."""
    check_backend(attention_backend(args))  # its package; whether it runs on the device is checked later
    if fsdp_settings():  # accelerate launch with an FSDP config
        check_fsdp_options(args, args.mixed_precision)
    plain_name(args.output_name, "--output_name")
    check_writable_folder(args.output_dir, "--output_dir")
    if args.logging_dir:
        check_writable_folder(args.logging_dir, "--logging_dir")
    if args.sample_prompts:
        check_sample_paths(args, args.task)
    return checkpoint_files(args.dit)
