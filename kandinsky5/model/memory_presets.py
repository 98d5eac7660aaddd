"""The ``--vram`` presets: the memory options a task needs on a GPU of 12, 16, 24, 48 or 80 GB.

Each stage's peak is estimated from what ``python benchmarks/stage_memory.py`` measured at the real
architectures' widths (docs/memory.md lists the figures, the date and the machine):

- weights: the exact bytes of each architecture (bf16, or fp8 for the blocks' Linear weights with one
  fp32 scale per 64), less the blocks kept in CPU memory by block swap plus the two in flight;
- a DiT step: a measured fixed part plus a measured slope per token, for the CFG batch of 2 (half of it
  with the passes one after the other);
- a LoRA training step with gradient checkpointing: one block's measured peak (fixed part and slope per
  token) plus, per further visual block, its measured stored input and LoRA state (only the LoRA state
  with the stored inputs offloaded to CPU memory);
- Qwen2.5-VL-7B: its weights (bf16 or fp8) plus the measured activations of a prompt; the VAE: the
  tiled decode's measured peak (bounded by the tile, whatever the size and length).

A preset takes, stage by stage, the least aggressive options whose estimate fits the GPU less a margin
(the CUDA context and the allocator's slack); options the user gives explicitly are kept as given.
When nothing fits, the preset refuses before anything loads.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from functools import cache

from kandinsky5.model.tasks import TaskPreset

GIB = 2**30
VRAM_CHOICES = (12, 16, 24, 48, 80)
MARGIN = 0.08  # of the GPU, for fragmentation and the allocator's cached blocks
CONTEXT_GIB = 0.6  # the CUDA context and cuBLAS/cuDNN workspaces

# Measured by `python benchmarks/stage_memory.py` (2026-12-04, 2-core CPU machine, torch 2.13; the CPU's
# peak anonymous memory stands in for the GPU's), in bytes above the weights:
#   dit_step: the CFG batch of 2, (fixed, per token), fitted to 1,536 and 6,144 tokens at the real widths
#   train_block: a LoRA step (rank 16, AdamW) with gradient checkpointing over 1 text + 1 visual block,
#     (fixed, per token); stored_per_block: (tokens, bytes) of each further visual block, (3 blocks - 1) / 2
MEASURED = {
    "lite": {
        "dit_step": (9_938_261, 78_383),
        "train_block": (34_212_523, 133_270),
        "stored_per_block": (6144, 26_267_648),
    },
    "pro": {
        "dit_step": (14_510_763, 180_660),
        "train_block": (31_921_493, 305_242),
        "stored_per_block": (6144, 53_100_544),
    },
    "image": {
        "dit_step": (7_180_288, 113_056),
        "train_block": (28_284_245, 191_058),
        "stored_per_block": (6144, 34_451_456),
    },
}
QWEN_BF16, QWEN_FP8 = 16_584_333_312, 10_466_875_392  # Qwen2.5-VL-7B's weights (counted on the meta device)
QWEN_ACTIVATIONS = 42_668_032  # a 256-token prompt
# the tiled decode's peak in fp32 (bf16 on a GPU needs about half): HunyuanVideo's 256 px tiles of 17 frames
# (the same at 256x256 and 512x256: bounded by the tile), FLUX's 1024 px tile (a 1024x1024 image)
VAE_TILED = {"hunyuan": 2_130_558_976, "flux": 3_226_808_320}
VAE_WEIGHTS = {"hunyuan": 985_915_212, "flux": 335_278_732}  # fp32; bf16 on a GPU is half
LORA_BYTES_PER_PARAMETER = 16  # fp32 weight, gradient and AdamW's two moments


class VramError(ValueError):
    pass


@dataclass(frozen=True)
class DitSizes:
    bf16: int
    fp8: int
    visual_block_bf16: int
    visual_block_fp8: int
    blocks: int  # text + visual
    lora_per_block: int  # rank-16 LoRA parameters of one visual block


def dit_sizes(task: TaskPreset) -> DitSizes:
    return _dit_sizes(task.name)


@cache
def _dit_sizes(task_name: str) -> DitSizes:
    from kandinsky5.model.checkpoint import expected_shapes
    from kandinsky5.model.dit import keeps_fp32
    from kandinsky5.model.tasks import get_task

    task = get_task(task_name)
    bf16 = fp8 = block_bf16 = block_fp8 = lora = 0
    for name, shape in expected_shapes(task.dit_params).items():
        count = 1
        for side in shape:
            count *= side
        size = count * (4 if keeps_fp32(name) else 2)
        quantized = count + count // 64 * 4 if "transformer_blocks." in name and len(shape) == 2 else size
        bf16, fp8 = bf16 + size, fp8 + quantized
        if name.startswith("visual_transformer_blocks.0."):
            block_bf16, block_fp8 = block_bf16 + size, block_fp8 + quantized
            if len(shape) == 2 and "modulation" not in name:
                lora += 16 * (shape[0] + shape[1])
    params = task.dit_params
    blocks = params["num_text_blocks"] + params["num_visual_blocks"]
    return DitSizes(bf16, fp8, block_bf16, block_fp8, blocks, lora)


def family(task: TaskPreset) -> str:
    """Which measured DiT a task's is: by its width (the tiny test models count as Lite)."""
    return {4096: "pro", 2560: "image"}.get(task.dit_params["model_dim"], "lite")


def resident_weights(task: TaskPreset, fp8: bool, swapped: int) -> int:
    sizes = dit_sizes(task)
    total, block = (sizes.fp8, sizes.visual_block_fp8) if fp8 else (sizes.bf16, sizes.visual_block_bf16)
    swapped = min(swapped, sizes.blocks)
    return total - swapped * block + min(swapped, 2) * block


def linear(pair: tuple[int, int], tokens: int) -> int:
    fixed, per_token = pair
    return fixed + per_token * tokens


def dit_step_peak(task: TaskPreset, tokens: int, fp8: bool, swapped: int, separate_cfg: bool) -> int:
    """Measured for the CFG batch of 2; one pass at a time (or a task without CFG) needs half of it."""
    activations = linear(MEASURED[family(task)]["dit_step"], tokens)
    batched = abs(task.guidance - 1.0) > 1e-6 and not separate_cfg
    return resident_weights(task, fp8, swapped) + (activations if batched else activations // 2)


def training_step_peak(task: TaskPreset, tokens: int, fp8: bool, swapped: int, offload: bool) -> int:
    measured, sizes = MEASURED[family(task)], dit_sizes(task)
    at_tokens, per_block = measured["stored_per_block"]
    further = task.dit_params["num_visual_blocks"] - 1
    lora_state = sizes.lora_per_block * LORA_BYTES_PER_PARAMETER
    stored = lora_state if offload else per_block * tokens // at_tokens
    return resident_weights(task, fp8, swapped) + linear(measured["train_block"], tokens) + further * stored


def text_peak(dtype: str) -> int:
    return (QWEN_FP8 if dtype == "fp8" else QWEN_BF16) + QWEN_ACTIVATIONS


def vae_peak(task: TaskPreset) -> int:
    return VAE_WEIGHTS[task.vae] // 2 + VAE_TILED[task.vae]  # bf16 weights on the GPU; fp32 activations as measured


def budget(vram: int) -> int:
    return int((vram * (1 - MARGIN) - CONTEXT_GIB) * GIB)


@dataclass
class Choice:
    options: dict[str, object] = field(default_factory=dict)  # dest -> value
    peaks: dict[str, int] = field(default_factory=dict)  # stage -> estimated bytes


def swap_counts(task: TaskPreset) -> list[int]:
    blocks = dit_sizes(task).blocks
    return list(range(4, blocks, 4)) + [blocks]


def generation_choice(task: TaskPreset, tokens: int, vram: int) -> Choice:
    """Options for generating ``tokens`` visual tokens per step on a GPU of ``vram`` GB."""
    limit, choice = budget(vram), Choice()
    text = [{"text_encoder_dtype": "bfloat16"}, {"text_encoder_dtype": "fp8"}]
    for options in text:
        if text_peak(options["text_encoder_dtype"]) <= limit:
            choice.options.update(options)
            choice.peaks["text encoding"] = text_peak(options["text_encoder_dtype"])
            break
    else:
        choice.options.update({"text_encoder_dtype": "fp8", "text_encoder_device": "cpu"})
        choice.peaks["text encoding"] = 0
    ladder = [(False, 0, False), (False, 0, True), (True, 0, False), (True, 0, True)]
    ladder += [(True, count, True) for count in swap_counts(task)]
    for fp8, swapped, separate in ladder:
        peak = dit_step_peak(task, tokens, fp8, swapped, separate)
        if peak <= limit:
            choice.options.update(fp8_base=fp8, blocks_to_swap=swapped, separate_cfg_passes=separate)
            choice.peaks["DiT step"] = peak
            break
    else:
        least = dit_step_peak(task, tokens, True, dit_sizes(task).blocks, True)
        raise VramError(
            f"--vram {vram}: a {task.name} step at {tokens} tokens needs about {least / GIB:.1f} GiB even with "
            "--fp8_base, every block swapped and --separate_cfg_passes; use a larger GPU or a smaller size or "
            "fewer frames (docs/memory.md)"
        )
    choice.options["vae_tiling"] = True
    choice.peaks["VAE decode (tiled)"] = vae_peak(task)
    return choice


def training_choice(task: TaskPreset, tokens: int, vram: int) -> Choice:
    """Options for a LoRA training step on samples of ``tokens`` visual tokens on a GPU of ``vram`` GB."""
    limit = budget(vram)
    ladder = [(False, 0, False), (True, 0, False), (True, 0, True)]
    ladder += [(True, count, True) for count in swap_counts(task)]
    for fp8, swapped, offload in ladder:
        peak = training_step_peak(task, tokens, fp8, swapped, offload)
        if peak <= limit:
            options = dict(gradient_checkpointing=True, gradient_checkpointing_cpu_offload=offload)
            return Choice({**options, "fp8_base": fp8, "blocks_to_swap": swapped}, {"training step": peak})
    least = training_step_peak(task, tokens, True, dit_sizes(task).blocks, True)
    raise VramError(
        f"--vram {vram}: a {task.name} LoRA step at {tokens} tokens needs about {least / GIB:.1f} GiB even with "
        "--fp8_base, every block swapped and activation offload; use a larger GPU or train on smaller or "
        "shorter clips (docs/memory.md)"
    )


def option_text(dest: str, value: object) -> str:
    if isinstance(value, bool):
        return f"--{dest}" if value else f"--no_{dest}" if dest == "vae_tiling" else f"no --{dest}"
    return f"--{dest} {value}"


def changes_something(dest: str, value: object) -> bool:
    """Whether the preset's value differs from the option's own default (only those are printed)."""
    return value not in (False, 0, "bfloat16") and dest != "vae_tiling"


def apply_choice(args: argparse.Namespace, choice: Choice, given: set[str], vram: int) -> str:
    """Set the preset's options the user did not give; returns the line that says what was chosen."""
    chosen, kept = [], []
    for dest, value in choice.options.items():
        if dest in given:
            kept.append(option_text(dest, getattr(args, dest)))
        else:
            setattr(args, dest, value)
            if changes_something(dest, value):
                chosen.append(option_text(dest, value))
    peaks = ", ".join(f"{stage} about {peak / GIB:.1f} GiB" for stage, peak in choice.peaks.items())
    line = f"--vram {vram}: {' '.join(chosen) or 'no memory option needed'}"
    if kept:  # the estimates are the preset's: the options kept as given may need more or less
        line += f"; kept as given: {' '.join(kept)}"
    label = "the preset's estimated peaks, not counting the options kept as given" if kept else "estimated peaks"
    return f"{line} ({label}: {peaks}; docs/memory.md)"


def add_vram_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--vram",
        type=int,
        choices=VRAM_CHOICES,
        help=f"GPU memory in GB: picks {what} from the measured table of docs/memory.md and prints what it chose; "
        "options given explicitly win; refuses, before loading anything, what cannot fit",
    )


def video_tokens(frames: int, width: int, height: int) -> int:
    """Visual tokens of one DiT step: latent frames x (H/16) x (W/16)."""
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)


def latent_tokens(shape: tuple[int, ...]) -> int:
    """Visual tokens of a cached latent of shape (T, H/8, W/8, C): T x (H/16) x (W/16)."""
    frames, height, width = shape[:3]
    return frames * (height // 2) * (width // 2)
