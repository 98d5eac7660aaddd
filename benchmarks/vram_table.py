"""The --vram presets of every task as a Markdown table: for each GPU size, the options generation and
LoRA training take and each stage's estimated peak, from the figures benchmarks/stage_memory.py
measured (kandinsky5/model/memory_presets.py holds them). docs/memory.md shows this table.

    python benchmarks/vram_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kandinsky5.model.memory_presets import (  # noqa: E402
    GIB,
    VRAM_CHOICES,
    VramError,
    changes_something,
    generation_choice,
    option_text,
    training_choice,
    video_tokens,
)
from kandinsky5.model.tasks import get_task  # noqa: E402

# (task, width, height, frames): the sizes people run (SD 768x512, HD 1024x1024; 5 s = 121 frames). I2V and
# I2I tasks have the architecture and sizes of their T2V and T2I ones, so their tables are the same; the
# CFG-distilled ones run one pass a step (guidance 1).
CASES = [
    ("k5-lite-t2v-5s-sd", 768, 512, 121),
    ("k5-lite-t2v-5s-distil-sd", 768, 512, 121),
    ("k5-lite-t2v-10s-sd", 768, 512, 241),
    ("k5-pro-t2v-5s-sd", 768, 512, 121),
    ("k5-pro-t2v-10s-sd", 768, 512, 241),
    ("k5-pro-t2v-5s-hd", 1024, 1024, 121),
    ("k5-pro-t2v-10s-hd", 1024, 1024, 241),
    ("k5-lite-t2i-hd", 1024, 1024, 1),
]

SAME_TABLE = {
    "k5-lite-t2v-5s-sd": "k5-lite-i2v-5s-sd",
    "k5-pro-t2v-5s-sd": "k5-pro-i2v-5s-sd",
    "k5-pro-t2v-5s-hd": "k5-pro-i2v-5s-hd",
    "k5-lite-t2i-hd": "k5-lite-i2i-hd",
}


def cell(chooser, task, tokens: int, vram: int) -> tuple[str, str]:
    try:
        choice = chooser(task, tokens, vram)
    except VramError as error:
        least = str(error).split("needs about ")[1].split(" GiB")[0]
        return "does not fit", f"needs about {least} GiB with every option"
    options = " ".join(option_text(d, v) for d, v in choice.options.items() if changes_something(d, v)) or "none"
    peaks = ", ".join(f"{stage} {peak / GIB:.1f}" for stage, peak in choice.peaks.items())
    return f"`{options}`" if options != "none" else "none", peaks


def main() -> None:
    for name, width, height, frames in CASES:
        task = get_task(name)
        tokens = video_tokens(frames, width, height)
        same = f" (and {SAME_TABLE[name]})" if name in SAME_TABLE else ""
        print(f"\n### {name}{same} ({task.description}), {width}x{height}, {frames} frame(s): {tokens:,} tokens\n")
        print("| GPU | generation options | its peaks (GiB) | LoRA training options | its peak (GiB) |")
        print("|---|---|---|---|---|")
        for vram in VRAM_CHOICES:
            generation = cell(generation_choice, task, tokens, vram)
            training = cell(training_choice, task, tokens, vram)
            print(f"| {vram} GB | {generation[0]} | {generation[1]} | {training[0]} | {training[1]} |")


if __name__ == "__main__":
    main()
