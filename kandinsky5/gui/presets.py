"""Memory settings per GPU size, as docs/memory.md suggests them for generation."""

from __future__ import annotations

# (fp8 DiT weights, blocks to swap) per model family and GPU memory
GENERATION_PRESETS = {
    "Lite": {"80 GB": (False, 0), "48 GB": (False, 0), "24 GB": (False, 0), "16 GB": (False, 0), "12 GB": (True, 0)},
    "Pro": {"80 GB": (False, 0), "48 GB": (True, 0), "24 GB": (True, 16), "16 GB": (True, 32), "12 GB": (True, 45)},
}
VRAM_CHOICES = ["80 GB", "48 GB", "24 GB", "16 GB", "12 GB"]


def family(task_name: str) -> str:
    return "Pro" if "-pro-" in task_name else "Lite"


def generation_preset(task_name: str, vram: str) -> tuple[bool, int]:
    """(--fp8_base, --blocks_to_swap) for a task on a GPU of ``vram``."""
    return GENERATION_PRESETS[family(task_name)][vram]
