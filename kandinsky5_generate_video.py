"""Generate videos (T2V, I2V) and images (T2I, I2I) with a Kandinsky 5 DiT, optionally with LoRAs.

Examples:
  python kandinsky5_generate_video.py --task k5-lite-t2v-5s-sd --prompt "A cat walks on the grass." \\
      --frames 121 --width 768 --height 512 --output cat.mp4
  python kandinsky5_generate_video.py --task k5-lite-i2v-5s-sd --image first.png --prompt "..." --output clip.mp4
  python kandinsky5_generate_video.py --task k5-lite-t2i-hd --prompt "..." --output image.png
  python kandinsky5_generate_video.py --task k5-lite-i2i-hd --image photo.jpg --prompt "make it winter" \\
      --output edit.png

Weights default to the layout of docs/weights.md under ./weights; see docs/inference.md for every option.
"""

import argparse
import sys

import torch

from kandinsky5.cli import (
    add_attention_arguments,
    add_magcache_arguments,
    add_nabla_arguments,
    add_prompt_expansion_arguments,
    add_task_argument,
    add_text_encoder_dtype_argument,
    add_vae_tiling_arguments,
    check_vae_tiling,
    given_options,
)
from kandinsky5.comfy_models import add_comfy_argument, fill_from_comfy
from kandinsky5.inference.jobs import prepare_request
from kandinsky5.inference.magcache import task_ratios
from kandinsky5.model.dtypes import DTYPES
from kandinsky5.model.memory_presets import add_vram_argument
from kandinsky5.model.tasks import default_paths
from kandinsky5.musubi_options import GENERATION_NOTICES, add_notice_options, announce_notices
from modules.option_types import (
    FINITE,
    FRAMES,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    SIDE,
    STEPS,
    ScriptParser,
    annotate_ranges,
    number,
)


def parser() -> argparse.ArgumentParser:
    p = ScriptParser(description=__doc__)
    add_task_argument(p, default="k5-pro-t2v-5s-sd")
    weights = p.add_argument_group("weights (defaults: the task's files under ./weights, see docs/weights.md)")
    weights.add_argument("--dit", help="DiT checkpoint: .safetensors file, diffusers folder or index.json")
    weights.add_argument("--vae", help="VAE folder or file (HunyuanVideo for video tasks, FLUX.1 for image tasks)")
    weights.add_argument("--text_encoder_qwen", help="Qwen2.5-VL-7B-Instruct folder")
    weights.add_argument("--text_encoder_clip", help="CLIP-L: clip_l.safetensors, its folder, or a HF CLIP folder")
    add_comfy_argument(weights)
    weights.add_argument(
        "--lora_weight",
        nargs="*",
        default=[],
        help="LoRA file(s) or official LoRA folder(s): "
        "kohya, PEFT/diffusers and official layouts are read; merged in fp32 before sampling",
    )
    weights.add_argument(
        "--lora_multiplier", nargs="*", type=FINITE, default=[], help="one multiplier per LoRA (default 1.0 each)"
    )

    what = p.add_argument_group("what to generate")
    what.add_argument(
        "--prompt", help="the prompt (may end with per-prompt options such as --w 768, as in --from_file)"
    )
    what.add_argument(
        "--negative_prompt",
        default=None,
        help="negative prompt for classifier-free guidance (default: the task's, as official)",
    )
    what.add_argument(
        "--from_file",
        help="a file of prompts, one per line, each with optional --w --h --f --d --s "
        "--g --n --i --ei --expand overrides; all are generated in one run without reloading the models",
    )
    what.add_argument("--image", help="first frame (I2V tasks) or source image (I2I tasks)")
    what.add_argument(
        "--image_last",
        help="I2V: the last frame, given in the conditioning of the last latent frame (first+last mode; the I2V "
        "models learned the first frame only: use a LoRA trained with --i2v_mode first_last)",
    )
    what.add_argument("--loop", action="store_true", help="I2V: the first image is the last frame too (a loop)")
    what.add_argument(
        "--width",
        type=SIDE,
        help="pixels, a multiple of 16 (128 for NABLA tasks); default: the task's resolution, or from --image",
    )
    what.add_argument("--height", type=SIDE, help="pixels; as --width")
    what.add_argument("--frames", type=FRAMES, help="pixel frames, 4k+1 (121 = 5 s at 24 fps); default: the task's")
    what.add_argument("--steps", type=STEPS, help="sampling steps (default: the task's)")
    what.add_argument("--guidance", type=FINITE, help="classifier-free guidance scale; 1 disables it (default: task)")
    what.add_argument("--scheduler_scale", type=POSITIVE, help="time schedule warp S (default: the task's)")
    what.add_argument("--seed", type=NON_NEGATIVE_INT, default=42, help="seed of the noise (default 42)")
    what.add_argument(
        "--fps",
        type=number(0, 1000, low_open=True),
        default=24.0,
        help="frames per second of written videos (default 24)",
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--output",
        help="output file (.mp4 for videos, .png for images); with --from_file a folder "
        "(default: outputs/<time>_<seed>.mp4|png)",
    )
    out.add_argument("--save_latent", action="store_true", help="also save each latent as <output>.latent.safetensors")
    out.add_argument("--latent_path", nargs="*", help="decode saved latent file(s) instead of sampling")

    run = p.add_argument_group("device, precision and memory")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    run.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="DiT compute dtype (default bfloat16)")
    run.add_argument(
        "--vae_dtype", choices=list(DTYPES), default=None, help="VAE dtype (default: bfloat16 on CUDA, float32 on CPU)"
    )
    run.add_argument(
        "--sequence_parallel",
        type=POSITIVE_INT,
        metavar="N",
        help="split each DiT step's visual tokens over N processes started with accelerate launch --num_processes N "
        "(N divides the attention heads: Lite 28, Pro 32, image models 20; and each job's tokens). Default: all the "
        "processes launched. See docs/runs.md",
    )
    run.add_argument("--text_encoder_device", help="device for Qwen and CLIP (default: --device)")
    add_text_encoder_dtype_argument(run)
    run.add_argument(
        "--separate_cfg_passes",
        action="store_true",
        help="run the conditional and unconditional passes one after the other instead of as one "
        "batch of 2 (same result, less memory)",
    )
    run.add_argument(
        "--fp8_base",
        action="store_true",
        help="store the DiT's block weights as block-scaled fp8 "
        "(quantized while loading; about half the memory); an fp8 checkpoint is always used as fp8",
    )
    run.add_argument(
        "--blocks_to_swap",
        type=NON_NEGATIVE_INT,
        default=0,
        help="keep this many transformer blocks (the last "
        "ones) in CPU memory, each moved to the GPU only while it runs; more than exist is clamped",
    )
    run.add_argument(
        "--offload_dit_during_sampling",
        action="store_true",
        help="accepted for musubi-tuner command lines: every stage here already loads only while "
        "it runs (text encoders, then DiT, then VAE), so this changes nothing",
    )
    add_prompt_expansion_arguments(p)
    add_vae_tiling_arguments(p)
    add_vram_argument(
        run, "--fp8_base, --blocks_to_swap, --separate_cfg_passes and Qwen's dtype (or CPU) for the task and size"
    )
    add_attention_arguments(p)
    add_nabla_arguments(p)
    add_magcache_arguments(p)
    add_notice_options(p, GENERATION_NOTICES, "musubi-tuner options with no effect here")
    return annotate_ranges(p)


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    announce_notices(args, GENERATION_NOTICES)
    check_vae_tiling(p, args)
    args.given_options = given_options(p, argv) if args.vram else set()
    task = args.task
    try:
        fill_from_comfy(args, task, ("dit", "vae", "text_encoder_qwen", "text_encoder_clip"))
    except ValueError as error:
        sys.exit(f"error: {error}")
    args.given_paths = {name for name in default_paths(task) if getattr(args, name) is not None}
    for name, path in default_paths(task).items():
        if getattr(args, name) is None:
            setattr(args, name, path)
    if args.negative_prompt is None:
        args.negative_prompt = task.negative_prompt
    if args.vae_dtype is None:
        args.vae_dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if len(args.lora_multiplier) > len(args.lora_weight):
        p.error(f"{len(args.lora_multiplier)} --lora_multiplier values for {len(args.lora_weight)} LoRA files")
    if args.magcache:
        try:
            task_ratios(task.name)
        except ValueError as error:
            p.error(str(error))
    if args.offload_dit_during_sampling:
        print("note: --offload_dit_during_sampling changes nothing: each stage already loads only while it runs")
    try:  # every check that needs no model code, before the models' code is imported (seconds of start-up)
        request = prepare_request(args, task)
    except ValueError as error:
        sys.exit(f"error: {error}")
    from kandinsky5.inference.generate import generate  # the models' code, once the options are known

    try:
        generate(args, task, request)
    except ValueError as error:  # every input error of the toolkit is a ValueError with a message for the user
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
