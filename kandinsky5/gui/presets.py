"""The web UI's GPU-memory presets: the --vram choices, and for the Generate page the two options its
form shows, from the measured table of kandinsky5/model/memory_presets.py (docs/memory.md)."""

from __future__ import annotations

from kandinsky5.model.memory_presets import VramError, dit_sizes, generation_choice, video_tokens
from kandinsky5.model.tasks import get_task

VRAM_CHOICES = ["80 GB", "48 GB", "24 GB", "16 GB", "12 GB"]


def generation_preset(task_name: str, vram: str) -> tuple[bool, int]:
    """(--fp8_base, --blocks_to_swap) for the task at its default size on a GPU of ``vram``; every block
    swapped where nothing fits (the generation then says what it needs)."""
    task = get_task(task_name)
    tokens = video_tokens(task.frames, task.resolution, task.resolution)
    try:
        options = generation_choice(task, tokens, int(vram.split()[0])).options
    except VramError:
        return True, dit_sizes(task).blocks
    return options["fp8_base"], options["blocks_to_swap"]
