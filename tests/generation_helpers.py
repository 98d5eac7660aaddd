"""Running the generation CLI on the tiny tree from tests."""

from __future__ import annotations

from pathlib import Path

import kandinsky5_generate_video

DIT_FILES = {
    "tiny-t2v": "tiny_t2v",
    "tiny-i2v": "tiny_t2v",
    "tiny-t2i": "tiny_t2i",
    "tiny-i2i": "tiny_i2i",
    "tiny-pro-t2v": "tiny_pro_t2v",
}


def generate(tree: Path, task: str, *extra: str) -> None:
    """The real command-line entry point, in this process (a subprocess test covers the script itself)."""
    vae = tree / ("vae" if task in ("tiny-t2v", "tiny-i2v", "tiny-pro-t2v") else "flux/vae")
    kandinsky5_generate_video.main(
        [
            "--task",
            task,
            "--dit",
            str(tree / "model" / f"{DIT_FILES[task]}.safetensors"),
            "--vae",
            str(vae),
            "--text_encoder_qwen",
            str(tree / "text_encoder"),
            "--text_encoder_clip",
            str(tree / "text_encoder2"),
            "--dtype",
            "float32",
            *extra,
        ]
    )
