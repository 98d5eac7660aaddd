"""The acceptance suite's tools: command lines as a user types them, run on the tiny tree.

A command is taken as text (from the spec or a fenced block of README.md / docs/), its continuation
lines joined, and changed only where the tiny tree needs it: the real tasks become the tiny tasks of
the same kind, the real weights' paths the tiny files, and sizes (frames, resolution, steps, epochs)
small. Everything else (every flag, its value, ``accelerate launch``) runs as written, as a
subprocess, in a workspace laid out like the one the docs assume (``weights/``, ``data/``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from modules.ports import free_port

from .media_factory import caption, write_image, write_video

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {p.name for p in ROOT.glob("*.py")}

# The spec's dataset config example, word for word.
SPEC_DATASET = """
[general]
enable_bucket = true
bucket_no_upscale = false

# Image dataset example
[[datasets]]
image_directory = "path/to/images"
cache_directory = "path/to/images/cache"
resolution = [512, 512]
batch_size = 1
num_repeats = 1
caption_extension = ".txt"

# Video dataset example
[[datasets]]
video_directory = "path/to/videos"
cache_directory = "path/to/videos/cache"
resolution = [256, 256]
batch_size = 1
num_repeats = 1
frame_extraction = "head"
target_frames = [17]
caption_extension = ".txt"
"""

# The real tasks and the tiny task of the same kind (and shape: Pro-shaped for Pro).
TINY_TASKS = [
    (r"k5-pro-i2v-5s-distil-sd", "tiny-i2v-distil"),
    (r"k5-pro-i2v-\S+", "tiny-i2v"),
    (r"k5-pro-t2v-\S+", "tiny-pro-t2v"),
    (r"k5-lite-i2v-\S+", "tiny-i2v"),
    (r"k5-lite-t2v-\S+", "tiny-t2v"),
    (r"k5-lite-t2i-\S+", "tiny-t2i"),
    (r"k5-lite-i2i-\S+", "tiny-i2i"),
]
# The scripts that take --task; without it they run the default task, Pro T2V.
TASK_SCRIPTS = {
    "kandinsky5_cache_latents.py",
    "kandinsky5_cache_text_encoder_outputs.py",
    "kandinsky5_train_network.py",
    "kandinsky5_generate_video.py",
}
DEFAULT_TINY_TASK = "tiny-pro-t2v"
TINY_DIT = {
    "tiny-t2v": "tiny_t2v",
    "tiny-i2v": "tiny_t2v",
    "tiny-i2v-distil": "tiny_t2v",
    "tiny-pro-t2v": "tiny_pro_t2v",
    "tiny-t2i": "tiny_t2i",
    "tiny-i2i": "tiny_i2i",
}
# Sizes made small: option -> the value the tiny run takes.
SMALL = {
    "--frames": "9",
    "--width": "64",
    "--height": "64",
    "--steps": "2",
    "--max_train_epochs": "2",
    "--save_every_n_epochs": "1",
    "--sample_every_n_steps": "1",
}
# What the CPU of the test machine cannot run, and what runs instead.
NEEDS_GPU = {
    "--flash_attn": ("--sdpa", "flash-attn needs a CUDA GPU (on a CPU the option stops with a one-line error)"),
    "--xformers": ("--sdpa", "xformers needs a CUDA GPU"),
    "--sage_attn": ("--sdpa", "SageAttention needs a CUDA GPU"),
}


def official_dit(value: str) -> bool:
    """A path naming an official DiT file (kandinsky5lite_..., kandinsky5pro_...)."""
    return Path(value).name.startswith("kandinsky5") and value.endswith(".safetensors")


def tiny_dit(path: str, tiny_task: str | None) -> str:
    """The tiny DiT standing in for an official DiT file: the command's task's, else by the file name."""
    if tiny_task is not None:
        return TINY_DIT[tiny_task]
    name = Path(path).name
    if name.startswith("kandinsky5pro"):
        return "tiny_pro_t2v"
    return next((TINY_DIT[f"tiny-{kind}"] for kind in ("i2i", "t2i") if kind in name), "tiny_t2v")


@dataclass
class TinyCommand:
    argv: list[str]
    changes: list[str]  # what was changed beyond paths, tasks and sizes, with the reason


def split_commands(block: str) -> list[str]:
    """The commands of a fenced shell block: continuation lines joined, comments and blanks dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def tiny_command(text: str, workspace: Path, paths: dict[str, str] | None = None) -> TinyCommand:
    """``text`` (one command line) as the tiny run's argv; ``paths`` maps path strings of the text
    to the workspace's (after the built-in mapping of official DiT files to tiny ones)."""
    words = shlex.split(text)
    task = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "--task"), None)
    tiny_task = None
    if task is not None:
        tiny_task = next((tiny for pattern, tiny in TINY_TASKS if re.fullmatch(pattern, task)), task)
    changes, argv = [], []
    for i, word in enumerate(words):
        previous = words[i - 1] if i else ""
        if word in NEEDS_GPU:
            replacement, reason = NEEDS_GPU[word]
            argv.append(replacement)
            changes.append(f"{word} -> {replacement}: {reason}")
            continue
        if word == "AdamW8Bit" and importlib.util.find_spec("bitsandbytes") is None:
            argv.append("AdamW")
            changes.append("AdamW8Bit -> AdamW: bitsandbytes is not installed here")
            continue
        if word.startswith("[") and word.endswith("]"):  # an optional flag shown in brackets: given
            word = word[1:-1]
        if previous == "--task":
            word = tiny_task
        elif previous in SMALL:
            word = SMALL[previous]
        elif paths and word in paths:
            word = paths[word]
        elif official_dit(word):
            word = str(workspace / "weights" / "model" / f"{tiny_dit(word, tiny_task)}.safetensors")
        argv.append(word)
    if task is None and any(Path(w).name in TASK_SCRIPTS for w in words):
        argv += ["--task", DEFAULT_TINY_TASK]
        changes.append(f"--task {DEFAULT_TINY_TASK} added: the default task (k5-pro-t2v-5s-sd) made tiny")
    return TinyCommand(launcher(argv), changes)


def launcher(argv: list[str]) -> list[str]:
    """``python`` and ``accelerate launch`` as this test run's interpreter; script names as files of
    the project (the commands run in the workspace, as a user's run in their own folder). Leading
    ``NAME=value`` words set environment variables, as in a shell."""
    settings = []
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
        settings, argv = [*settings, argv[0]], argv[1:]
    if settings:
        return ["env", *settings, *launcher(argv)]
    if argv[:2] == ["accelerate", "launch"]:
        # one process on the CPU, unless the command asks for several (they then talk over gloo)
        several = "--multi_gpu" in argv or "--config_file" in argv
        mode = ["--main_process_port", str(free_port())] if several and "--main_process_port" not in argv else []
        argv = [sys.executable, "-m", "accelerate.commands.launch", *(mode if several else ["--cpu"]), *argv[2:]]
    elif argv[0] in ("python", "python3"):
        argv = [sys.executable, *argv[1:]]
    return [str(ROOT / word) if word in SCRIPTS or word.startswith("examples/") else word for word in argv]


def run(argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def check(result: subprocess.CompletedProcess, text: str) -> None:
    assert result.returncode == 0, f"{text}\nexit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def make_workspace(tiny_tree: Path, folder: Path) -> Path:
    """A folder laid out as the docs assume: ``weights/`` (the tiny tree), ``data/`` with clips,
    photos, editing pairs and captions, a first frame, a photo to edit and a prompt file."""
    shutil.copytree(tiny_tree, folder / "weights")
    for name, (kind, count) in {"clips": ("video", 2), "photos": ("image", 2), "videos": ("video", 1)}.items():
        directory = folder / "data" / name
        directory.mkdir(parents=True)
        for i in range(count):
            if kind == "video":
                media = write_video(directory / f"walk_{i + 1:03d}.mp4", 13, 64, 48, seed=i)
            else:
                media = write_image(directory / f"photo_{i + 1:03d}.png", 64, 48, seed=i)
            caption(media, f"A man in a red coat walks along a pier, take {i + 1}")
    (folder / "data" / "images").symlink_to(folder / "data" / "photos")
    for name in ("targets", "sources"):  # image-editing pairs: a source and its edited target, by name
        (folder / "data" / "edits" / name).mkdir(parents=True)
    for i in range(2):
        write_image(folder / "data" / "edits" / "sources" / f"cat_{i + 1:03d}.jpg", 64, 48, seed=10 + i)
        target = write_image(folder / "data" / "edits" / "targets" / f"cat_{i + 1:03d}.png", 64, 48, seed=20 + i)
        caption(target, "Make it winter")
    write_image(folder / "first.png", 64, 48, seed=7)
    write_image(folder / "photo.jpg", 64, 48, seed=8)
    (folder / "prompts.txt").write_text("a red fox in the snow --f 9 --s 2 --w 64 --h 64\na boat at sea --s 2\n")
    return folder
