"""Encode the captions of a dataset config with Qwen2.5-VL and CLIP for training.

Writes one cache file per image and per video (its clips share it) into each dataset's
cache_directory. Video captions use the video prompt template and image captions the image one,
each at the task's length, exactly as generation encodes prompts. Items without a caption are
reported and skipped; the exit code is non-zero if anything failed.
"""

import argparse
import sys

import torch

from dataset.config import load_dataset_config
from kandinsky5.cli import add_task_argument, add_text_encoder_dtype_argument, given_options, run_caching
from kandinsky5.comfy_models import add_comfy_argument, fill_from_comfy
from kandinsky5.inference.weight_paths import check_paths
from kandinsky5.model.tasks import default_paths
from modules.option_types import POSITIVE_INT, ScriptParser, annotate_ranges


def parser() -> argparse.ArgumentParser:
    p = ScriptParser(description=__doc__)
    p.add_argument("--dataset_config", required=True, help="dataset config file (.toml or .json)")
    add_task_argument(p, default="k5-pro-t2v-5s-sd")
    p.add_argument("--text_encoder_qwen", help="Qwen2.5-VL-7B-Instruct folder (default weights/text_encoder)")
    p.add_argument("--text_encoder_clip", help="clip_l.safetensors or a CLIP folder (default weights/text_encoder2)")
    add_comfy_argument(p)
    add_text_encoder_dtype_argument(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--batch_size", type=POSITIVE_INT, help="captions encoded together (default: the dataset's batch_size)"
    )
    p.add_argument(
        "--skip_existing",
        action="store_true",
        help="skip items whose cache holds the same caption, template, length and encoders",
    )
    p.add_argument(
        "--keep_cache",
        action="store_true",
        help="keep cache files of items no longer in the dataset (default: delete them)",
    )
    return annotate_ranges(p)


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    args.task_given = "task" in given_options(p, argv)
    task = args.task
    try:
        fill_from_comfy(args, task, ("text_encoder_qwen", "text_encoder_clip"))
    except ValueError as error:
        sys.exit(f"error: {error}")
    defaults = default_paths(task)
    names = ("text_encoder_qwen", "text_encoder_clip")
    given = {name for name in names if getattr(args, name)}
    args.text_encoder_qwen = args.text_encoder_qwen or defaults["text_encoder_qwen"]
    args.text_encoder_clip = args.text_encoder_clip or defaults["text_encoder_clip"]
    try:  # the config and the encoders checked before the encoders' code is imported (seconds of start-up)
        load_dataset_config(args.dataset_config)
        check_paths({name: getattr(args, name) for name in names}, given, task.name)
    except ValueError as error:
        sys.exit(f"error: {error}")
    from kandinsky5.caching.cache_text import cache_text  # the encoders' code, once the options are known

    run_caching(cache_text, args)


if __name__ == "__main__":
    main()
