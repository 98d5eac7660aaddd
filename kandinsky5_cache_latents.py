"""Encode the images and videos of a dataset config to VAE latents for training.

Writes one cache file per image and per video clip into each dataset's cache_directory (format:
docs/dataset_config.md). Bad media (unreadable, too short, no caption) is reported and skipped; the
rest is cached; the exit code is non-zero if anything failed. Re-run with --skip_existing to cache
only what is missing or out of date.
"""

import argparse
import os
import sys

import torch

from dataset.config import load_dataset_config
from kandinsky5.cli import add_task_argument, given_options, run_caching
from kandinsky5.comfy_models import add_comfy_argument, fill_from_comfy
from kandinsky5.inference.weight_paths import check_paths
from kandinsky5.model.dtypes import DTYPES
from kandinsky5.model.tasks import default_paths
from kandinsky5.musubi_options import LATENT_CACHING_NOTICES, add_notice_options, announce_notices
from modules.option_types import NON_NEGATIVE_INT, POSITIVE_INT, ScriptParser, annotate_ranges, integer


def parser() -> argparse.ArgumentParser:
    p = ScriptParser(description=__doc__)
    p.add_argument("--dataset_config", required=True, help="dataset config file (.toml or .json)")
    add_task_argument(p, default="k5-pro-t2v-5s-sd")
    p.add_argument(
        "--vae",
        help="VAE folder or file; the task decides which VAE: HunyuanVideo for video tasks, "
        "FLUX.1 for image tasks (default: weights/vae or weights/flux/vae)",
    )
    add_comfy_argument(p)
    p.add_argument("--vae_dtype", choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--batch_size",
        type=POSITIVE_INT,
        help="latents encoded together (same size only; default: the dataset's batch_size)",
    )
    p.add_argument(
        "--num_workers",
        type=POSITIVE_INT,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="threads decoding and resizing media ahead of the VAE",
    )
    p.add_argument(
        "--skip_existing",
        action="store_true",
        help="skip items whose cache file exists and was made from the same source, size, clip and VAE",
    )
    p.add_argument(
        "--keep_cache",
        action="store_true",
        help="keep cache files of items no longer in the dataset (default: delete them)",
    )
    p.add_argument("--vae_tiling", action="store_true", help="encode in overlapping tiles (less memory)")
    p.add_argument("--vae_tile_size", type=integer(64), default=256, help="tile side in pixels with --vae_tiling")
    p.add_argument(
        "--vae_tile_frames", type=POSITIVE_INT, default=16, help="frames per temporal tile with --vae_tiling"
    )
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="seed of the VAE posterior samples")
    add_notice_options(p, LATENT_CACHING_NOTICES, "musubi-tuner options with no effect here")
    return annotate_ranges(p)


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    args.task_given = "task" in given_options(p, argv)
    announce_notices(args, LATENT_CACHING_NOTICES)
    task = args.task
    try:
        fill_from_comfy(args, task, ("vae",))
    except ValueError as error:
        sys.exit(f"error: {error}")
    given = {"vae"} if args.vae else set()
    args.vae = args.vae or default_paths(task)["vae"]
    args.vae_dtype = DTYPES[args.vae_dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    try:  # the config and the VAE checked before the VAE's code is imported (seconds of start-up)
        load_dataset_config(args.dataset_config)
        check_paths({"vae": args.vae}, given, task.name)
    except ValueError as error:
        sys.exit(f"error: {error}")
    from kandinsky5.caching.cache_latents import cache_latents  # the VAE's code, once the options are known

    run_caching(cache_latents, args)


if __name__ == "__main__":
    main()
