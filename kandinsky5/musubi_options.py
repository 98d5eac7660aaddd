"""musubi-tuner options that change nothing here: accepted, with one notice each saying why and what
to use instead, so a musubi-tuner command line or --config_file runs unchanged.

Options with a musubi-tuner meaning that this toolkit implements are ordinary options of the scripts;
this module holds only the ones that have no effect here.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

# option -> (argparse keywords, why it changes nothing here / what to use instead)
TRAINING_NOTICES: dict[str, tuple[dict, str]] = {
    "--guidance_scale": (
        {"type": float},
        "Kandinsky 5 has no embedded guidance input (that is HunyuanVideo's); training ignores it",
    ),
    "--ddp_static_graph": (
        {"action": "store_true"},
        "no DDP wrapper is used here: the LoRA's gradients are averaged over the processes directly",
    ),
    "--ddp_gradient_as_bucket_view": (
        {"action": "store_true"},
        "no DDP wrapper is used here: the LoRA's gradients are averaged over the processes directly",
    ),
    "--split_attn": (
        {"action": "store_true"},
        "attention already runs per sample's own text length (masked or varlen); nothing to split",
    ),
    "--block_swap_ring_size": (
        {"type": int},
        "block swap here keeps one block in flight and prefetches the next on a side stream; no ring to size",
    ),
    "--block_swap_h2d_only": (
        {"action": "store_true"},
        "swapped blocks here are frozen weights that never go back to the CPU: transfers are host-to-device only",
    ),
    "--use_pinned_memory_for_block_swap": (
        {"action": "store_true"},
        "swapped blocks are always kept in pinned memory on CUDA here",
    ),
    "--img_in_txt_in_offloading": (
        {"action": "store_true"},
        "HunyuanVideo's img_in/txt_in layers do not exist in Kandinsky 5; use --blocks_to_swap",
    ),
    "--disable_numpy_memmap": (
        {"action": "store_true"},
        "checkpoints are read tensor by tensor with plain reads here, never memory-mapped",
    ),
    "--fp8_scaled": (
        {"action": "store_true"},
        "--fp8_base already stores block-scaled fp8 weights (one scale per 64 values); use --fp8_base",
    ),
    "--nabla_add_sta": (
        {"action": "store_true"},
        "the NABLA tasks' presets set add_sta as the official configs do (see --task and docs/attention.md)",
    ),
    "--no_vae_load": (
        {"action": "store_true"},
        "training never loads the VAE, except for --sample_prompts",
    ),
    "--override_dit": (
        {},
        "give the checkpoint to train on with --dit",
    ),
}
GENERATION_NOTICES: dict[str, tuple[dict, str]] = {
    "--fp8_scaled": (
        {"action": "store_true"},
        "--fp8_base already stores block-scaled fp8 weights (one scale per 64 values); use --fp8_base",
    ),
    "--fp8_fast": (
        {"action": "store_true"},
        "fp8 weights are widened to the compute dtype for each matmul here (no fp8 matmul); --fp8_base is the "
        "memory saver",
    ),
    "--disable_numpy_memmap": (
        {"action": "store_true"},
        "checkpoints are read tensor by tensor with plain reads here, never memory-mapped",
    ),
}

LATENT_CACHING_NOTICES: dict[str, tuple[dict, str]] = {
    "--nabla_resize": (
        {"action": "store_true"},
        "caching with a NABLA task (the 10 s and HD ones, or the --task you train with) already makes every "
        "bucket a multiple of 128 px, which NABLA attention needs",
    ),
}


def add_notice_options(parser: argparse.ArgumentParser, notices: dict[str, tuple[dict, str]], title: str) -> None:
    names = ", ".join(notices)
    description = f"accepted so that musubi-tuner command lines run, each with a note saying why: {names}"
    group = parser.add_argument_group(title, textwrap.fill(description, width=96, subsequent_indent="  "))
    for option, (keywords, _) in notices.items():  # (listed in the description: one line each was 45 lines)
        group.add_argument(option, default=None, help=argparse.SUPPRESS, **keywords)


def announce_notices(args: argparse.Namespace, notices: dict[str, tuple[dict, str]]) -> list[str]:
    """Print one line per given option that changes nothing here; returns the lines."""
    lines = []
    for option, (_, why) in notices.items():
        value = getattr(args, option.removeprefix("--"), None)
        if value not in (None, False):
            lines.append(f"note: {option} changes nothing here: {why}")
    for line in lines:
        print(line, file=sys.stderr)
    return lines
