"""Running the generation CLI on the tiny tree from tests."""

from __future__ import annotations

from pathlib import Path

import kandinsky5_generate_video
from modules.ports import free_port

DIT_FILES = {
    "tiny-t2v": "tiny_t2v",
    "tiny-t2v-nabla": "tiny_t2v",
    "tiny-i2v": "tiny_t2v",
    "tiny-i2v-distil": "tiny_t2v",
    "tiny-t2i": "tiny_t2i",
    "tiny-i2i": "tiny_i2i",
    "tiny-pro-t2v": "tiny_pro_t2v",
}


def model_args(tree: Path, task: str) -> list[str]:
    """The generation options naming the tiny tree's models for ``task``, the DiT in float32."""
    vae = tree / ("flux/vae" if task in ("tiny-t2i", "tiny-i2i") else "vae")
    return ["--task", task, "--dit", str(tree / "model" / f"{DIT_FILES[task]}.safetensors"), "--vae", str(vae),
            "--text_encoder_qwen", str(tree / "text_encoder"), "--text_encoder_clip", str(tree / "text_encoder2"),
            "--dtype", "float32"]  # fmt: skip


def generate(tree: Path, task: str, *extra: str) -> None:
    """The real command-line entry point, in this process (a subprocess test covers the script itself)."""
    kandinsky5_generate_video.main([*model_args(tree, task), *extra])


def sampled_latent(tree: Path, folder: Path, name: str, *extra: str, prompt: str = "a dog"):
    """Generate 2 steps with tiny-t2v through the CLI and return the saved latent."""
    from safetensors.torch import load_file

    generate(
        tree,
        "tiny-t2v",
        "--prompt",
        prompt,
        "--steps",
        "2",
        "--save_latent",
        "--output",
        str(folder / f"{name}.mp4"),
        *extra,
    )
    return load_file(str(folder / f"{name}.mp4.latent.safetensors"))["latent"]


def accelerate_launch(
    processes: int, *args: str, script: str = "kandinsky5_train_network.py", config_file: Path | None = None
) -> list[str]:
    """The command starting ``script`` with ``processes`` processes on this machine (--multi_gpu
    without CUDA: the processes talk over gloo on the CPU), or with an accelerate ``config_file``."""
    import sys

    mode = ["--multi_gpu"] if processes > 1 else ["--cpu"]
    if config_file is not None:
        mode = ["--config_file", str(config_file)]
    if processes > 1:  # tests run side by side (pytest-xdist): each launch its own rendezvous port
        mode += ["--main_process_port", str(free_port())]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *mode,
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        script,
        *args,
    ]
