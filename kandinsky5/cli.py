"""Argument helpers shared by the command-line scripts."""

from __future__ import annotations

import argparse
import sys

from dataset.process_share import Processes
from kandinsky5.inference.magcache import DEFAULT_MAX_SKIPS, DEFAULT_RETENTION, DEFAULT_THRESHOLD
from kandinsky5.model.tasks import TASKS, TaskPreset, UnknownTaskError, get_task
from modules.option_types import NON_NEGATIVE, NON_NEGATIVE_INT, integer, number

ATTENTION_FLAGS = {
    "sdpa": "PyTorch scaled_dot_product_attention (works on CPU and GPU, needs no extra package)",
    "flash_attn": "FlashAttention 2 (pip install flash-attn; CUDA only)",
    "flash3": "FlashAttention 3 (Hopper GPUs; flash_attn_interface built from flash-attention's hopper/ folder)",
    "xformers": "xformers memory-efficient attention (pip install xformers; CUDA only)",
    "sage_attn": "SageAttention (pip install sageattention; CUDA only)",
}


def _task(name: str) -> TaskPreset:
    try:
        return get_task(name)
    except UnknownTaskError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def task_table() -> str:
    return "\n".join(f"  {name:<28} {task.description}" for name, task in TASKS.items())


def add_task_argument(
    parser: argparse.ArgumentParser, default: str | None = None, role: str = "the weights come from --dit"
) -> None:
    parser.add_argument(
        "--task",
        type=_task,
        default=default,
        required=default is None,
        metavar="TASK",
        help=f"model configuration: architecture and default settings (see the task list below); {role}"
        + (f" (default: {default})" if default else ""),
    )
    parser.epilog = ((parser.epilog or "") + "\n\ntasks:\n" + task_table()).strip()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def add_text_encoder_dtype_argument(parser) -> None:
    """Qwen's weight dtype, or fp8 (``parser`` may be an argument group)."""
    from kandinsky5.model.dtypes import TEXT_ENCODER_DTYPES

    parser.add_argument(
        "--text_encoder_dtype",
        choices=list(TEXT_ENCODER_DTYPES),
        default="bfloat16",
        help="Qwen weights: bfloat16 (default), float16, float32, or fp8 (block-scaled float8 "
        "weights computed in bf16: about half the memory)",
    )


def add_attention_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "attention backend (at most one; default: the fastest exact one installed, see docs/attention.md)"
    ).add_mutually_exclusive_group()
    for flag, text in ATTENTION_FLAGS.items():
        group.add_argument(f"--{flag}", action="store_true", help=text)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each transformer block (the first step compiles: slower start, faster steps)",
    )


def add_vae_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    """Generation's (and training samples') VAE decoding: tiled by default, as the official pipelines."""
    group = parser.add_argument_group("VAE decoding (tiled by default, as the official pipelines)")
    group.add_argument(
        "--vae_tiling",
        action="store_true",
        default=True,
        help="decode in overlapping tiles, blended (the default): bounded memory whatever the size and length",
    )
    group.add_argument(
        "--no_vae_tiling",
        dest="vae_tiling",
        action="store_false",
        help="decode in one piece: slightly different pixels, but far more memory (a 5 s HunyuanVideo "
        "clip in one piece does not fit a 24 GB GPU; see docs/memory.md)",
    )
    group.add_argument(
        "--vae_tile_size",
        type=integer(64, 8192),
        help="tile side in pixels, a multiple of 8; tiles overlap by a quarter "
        "(default: 256 for the video VAE, 1024 for the FLUX image VAE)",
    )
    group.add_argument(
        "--vae_tile_frames",
        type=integer(4, 1024),
        help="video: pixel frames per temporal tile, a multiple of 4; tiles overlap by a quarter (default 16)",
    )


def add_prompt_expansion_arguments(parser: argparse.ArgumentParser) -> None:
    """Generation's prompt expansion (on by default, as the official pipelines) and LoRA trigger words."""
    group = parser.add_argument_group("prompt expansion (on by default, as the official pipelines)")
    group.add_argument(
        "--expand_prompt",
        action="store_const",
        const=True,
        default=None,
        help="Qwen2.5-VL rewrites each prompt into a detailed one with the official instruction of the task "
        "(I2V and I2I show it the image) before encoding; the default. Costs one Qwen answer (up to 256 tokens) "
        "per prompt; needs Qwen's language-model head (the full Qwen folder has it)",
    )
    group.add_argument(
        "--no_expand_prompt",
        dest="expand_prompt",
        action="store_const",
        const=False,
        help="encode the prompts as typed (what musubi-tuner and diffusers do)",
    )
    group.add_argument(
        "--lora_trigger",
        help="text put directly before each expanded prompt instead of the LoRAs' own trigger words "
        "(their 'trigger' metadata, which the official pipelines read); '' for none",
    )


def check_vae_tiling(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.vae_tile_size is not None and args.vae_tile_size % 8:
        parser.error(f"--vae_tile_size: {args.vae_tile_size} is not a multiple of 8 (the VAE's pixels per latent)")
    if args.vae_tile_frames is not None and args.vae_tile_frames % 4:
        parser.error(f"--vae_tile_frames: {args.vae_tile_frames} is not a multiple of 4 (pixel frames per latent)")


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations the command line (or a --config_file read into the parser's defaults) sets."""
    saved = [(action, action.default) for action in parser._actions]
    for action, _ in saved:
        action.default = argparse.SUPPRESS
    try:
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(namespace))


def run_caching(cache, args: argparse.Namespace) -> None:
    """Run a caching job, print its summary and exit 1 if any item failed (input errors exit with a
    message). Under ``accelerate launch --num_processes N`` the processes split the items and the
    first prints the summary of all."""
    processes = Processes.from_environment()
    args.device = processes.device(args.device)
    try:
        report = processes.merge(cache(args, args.task, processes))
    except ValueError as error:  # the toolkit's input errors: config, weights, encoders
        default = "" if args.task_given else f" (--task was not given, so the default task {args.task.name} applied)"
        sys.exit(f"error: {error}{default}")
    processes.finish()
    if processes.main:
        print(report.summary(processes.count))
    if report.failures:
        sys.exit(1)


def add_nabla_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("NABLA block-sparse attention (used by the 10 s and HD tasks)")
    group.add_argument(
        "--force_nabla_attention",
        action="store_true",
        help="use NABLA also for a task that does not (frame sides must be multiples of 128)",
    )
    group.add_argument(
        "--nabla_P",
        type=number(0, 1, low_open=True),
        help="attention mass each query block keeps (task default 0.7-0.9; 1 = dense)",
    )
    group.add_argument("--nabla_wT", type=NON_NEGATIVE_INT, help="local window in frames (default 11)")
    group.add_argument(
        "--nabla_wH", type=NON_NEGATIVE_INT, help="local window in 8x8-token tiles, vertically (default 3)"
    )
    group.add_argument(
        "--nabla_wW", type=NON_NEGATIVE_INT, help="local window in 8x8-token tiles, horizontally (default 3)"
    )
    group.add_argument("--no_nabla_add_sta", action="store_true", help="do not add the local window to the kept blocks")
    group.add_argument(
        "--nabla_method",
        choices=["topcdf", "topk"],
        help="keep blocks by cumulative mass (default) or the P fraction of largest",
    )


def add_magcache_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "MagCache (skips the visual blocks on predictable steps; SFT and no-CFG tasks; see docs/inference.md)"
    )
    group.add_argument("--magcache", action="store_true", help="enable MagCache with the task's magnitude ratios")
    group.add_argument(
        "--magcache_threshold",
        type=NON_NEGATIVE,
        default=DEFAULT_THRESHOLD,
        help=f"accumulated error under which a step may reuse the cached residual (default {DEFAULT_THRESHOLD}; "
        "0 never skips, larger skips more and drifts more)",
    )
    group.add_argument(
        "--magcache_max_skips",
        type=NON_NEGATIVE_INT,
        default=DEFAULT_MAX_SKIPS,
        help=f"at most this many steps in a row reuse the residual (default {DEFAULT_MAX_SKIPS})",
    )
    group.add_argument(
        "--magcache_retention",
        type=number(0, 1),
        default=DEFAULT_RETENTION,
        help=f"fraction of the steps at the start that always compute (default {DEFAULT_RETENTION})",
    )
