"""A generation request as jobs, and every check of it that needs no model code: prompt lines and their
options, sizes, outputs, saved latents, the attention package, a --vram preset and the weight paths. The
script runs these checks before it imports the models' code (seconds of start-up), and generation
itself builds its jobs with the same functions."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kandinsky5.inference.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, load_image
from kandinsky5.inference.processes import sequence_parallel_size
from kandinsky5.inference.prompt_file import PromptLine, parse_prompt_line, read_prompt_file
from kandinsky5.inference.sizes import check_frames, check_size, i2v_size, nearest_allowed_size
from kandinsky5.inference.weight_paths import check_weights
from kandinsky5.model.attention import attention_backend, check_backend
from kandinsky5.model.memory_presets import generation_choice, video_tokens
from kandinsky5.model.nabla import nabla_params
from kandinsky5.model.tasks import TaskPreset
from modules.output_paths import check_output_file

LATENT_SUFFIX = ".latent.safetensors"


class GenerationError(ValueError):
    pass


@dataclass
class Job:
    index: int
    prompt: str
    negative_prompt: str
    width: int
    height: int
    frames: int
    seed: int
    steps: int
    guidance: float
    image: str | None
    output: Path
    image_last: str | None = None  # I2V: the last frame (the first image again with --loop)
    expand_prompt: bool = False
    expanded_prompt: str | None = None  # what was encoded, when the prompt was expanded


def _output_for(args: argparse.Namespace, line: PromptLine, index: int, frames: int, seed: int) -> Path:
    extension = ".mp4" if frames > 1 else ".png"
    if args.from_file:
        return Path(args.output or "outputs") / f"{index:03d}_{seed}{extension}"
    if args.output:
        return Path(args.output)
    return Path("outputs") / f"{time.strftime('%Y%m%d-%H%M%S')}_{seed}{extension}"


def first_given(*values):
    """The first value that is not None (a 0 given by the user is a value, not "use the default")."""
    return next((value for value in values if value is not None), None)


def check_output(output: Path, frames: int, where: str = "") -> None:
    """An output file the writers can make: a known extension for the kind, not an existing folder."""
    suffix = output.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
        kinds = f"videos: {', '.join(VIDEO_EXTENSIONS)}; images: {', '.join(IMAGE_EXTENSIONS)}"
        raise GenerationError(f"{where}output {output}: unknown extension {suffix or '(none)'!r} ({kinds})")
    if frames > 1 and suffix in IMAGE_EXTENSIONS:
        raise GenerationError(f"{where}{output} is an image file but {frames} frames are asked for")
    check_output_file(output, f"{where}output")


def last_image(args: argparse.Namespace, line: PromptLine, task: TaskPreset, image: str | None, where: str):
    """The I2V last frame of a job: the line's --ei, --image_last, or with --loop the first image."""
    last = line.image_last or getattr(args, "image_last", None)
    loop = getattr(args, "loop", False)
    if (last or loop) and task.kind != "i2v":
        option = "--loop" if loop and not last else "--image_last"
        raise GenerationError(f"{where}{option} is for image-to-video tasks; {task.name} is {task.kind}")
    if loop and last:
        raise GenerationError(f"{where}--loop makes the first image the last one: give it or --image_last, not both")
    if last:
        try:
            load_image(last)  # a missing or unreadable file is named before any model loads
        except ValueError as error:
            raise GenerationError(f"{where}--image_last: {error}") from None
    return image if loop else last


def build_jobs(args: argparse.Namespace, task: TaskPreset) -> list[Job]:
    """One job per prompt, with per-line overrides, every size checked before any model loads."""
    if args.from_file:
        if args.output and Path(args.output).suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
            raise GenerationError("with --from_file, --output is a folder (one file per prompt line)")
        lines = read_prompt_file(args.from_file)
    else:
        if not args.prompt:
            raise GenerationError("give --prompt, --from_file or --latent_path")
        lines = [parse_prompt_line(args.prompt, 1, "--prompt") if " --" in args.prompt else PromptLine(args.prompt, 1)]
    jobs = []
    for index, line in enumerate(lines):
        where = f"line {line.line} of {args.from_file}: " if args.from_file else ""
        image = line.image or args.image
        if task.kind == "i2v" and not image:
            raise GenerationError(f"{where}task {task.name} is image-to-video: give --image (the first frame)")
        if task.kind in ("t2v", "t2i") and image:
            raise GenerationError(f"{where}task {task.name} takes no image; use an i2v or i2i task")
        image_last = last_image(args, line, task, image, where)
        frames = first_given(line.frames, args.frames, task.frames)
        width, height = first_given(line.width, args.width), first_given(line.height, args.height)
        if image and (width is None or height is None):
            source = load_image(image)
            pick = i2v_size if task.kind == "i2v" else nearest_allowed_size
            width, height = pick(source.width, source.height, task)
        width, height = first_given(width, task.resolution), first_given(height, task.resolution)
        try:
            check_frames(frames)
            if image_last and frames < 5:
                raise GenerationError(f"a last frame needs at least 5 frames (2 latent frames), got {frames}")
            if not task.is_video and frames != 1:
                raise GenerationError(f"task {task.name} makes images: frames must be 1, got {frames}")
            check_size(width, height, task, 128 if nabla_params(args, task) else None)
        except ValueError as error:
            raise GenerationError(f"{where}{error}") from None
        seed = line.seed if line.seed is not None else args.seed
        job = Job(
            index=index,
            prompt=line.prompt,
            width=width,
            height=height,
            frames=frames,
            seed=seed,
            negative_prompt=line.negative_prompt if line.negative_prompt is not None else args.negative_prompt,
            steps=first_given(line.steps, args.steps, task.steps),
            guidance=first_given(line.guidance, args.guidance, task.guidance),
            image=image,
            image_last=image_last,
            output=_output_for(args, line, index, frames, seed),
            expand_prompt=first_given(line.expand_prompt, args.expand_prompt, True),
        )
        check_output(job.output, frames, where)
        jobs.append(job)
    return jobs


def latent_file(output: Path) -> Path:
    """Where --save_latent writes the latent of ``output``: ``<output>.latent.safetensors``."""
    return Path(f"{output}{LATENT_SUFFIX}")


def read_latent_file(path: str | Path) -> tuple[torch.Tensor, dict]:
    """The latent and generation metadata of a --save_latent file; a named error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise GenerationError(f"--latent_path {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if "latent" not in f.keys() or "kandinsky5" not in metadata:
                raise GenerationError(
                    f"--latent_path {path}: not a latent file of this toolkit (expected a 'latent' tensor and "
                    "'kandinsky5' metadata, as --save_latent writes)"
                )
            return f.get_tensor("latent"), json.loads(metadata["kandinsky5"])
    except SafetensorError as error:
        raise GenerationError(f"--latent_path {path}: not a safetensors file ({error})") from None


@dataclass
class Request:
    """A checked generation request: its jobs, or for --latent_path each file's latent and metadata, and
    the --vram choice that fits it (applied by generate())."""

    jobs: list[Job]
    latents: list[tuple[torch.Tensor, dict]]
    vram_choice: object | None = None
    sequence_parallel: int = 1  # processes that share each DiT step (kandinsky5/inference/processes.py)


def prepare_request(args: argparse.Namespace, task: TaskPreset) -> Request:
    """Every check of the request that needs no model, in the order generation meets them (an error raises
    ValueError): saved latents, or the attention package, the jobs, a --vram preset; then the weight paths."""
    if args.latent_path:
        latents = [read_latent_file(path) for path in args.latent_path]  # every file checked before the VAE loads
        check_weights(args, task)
        return Request([], latents)
    check_backend(attention_backend(args), torch.device(args.device))
    jobs = build_jobs(args, task)
    split = sequence_parallel_size(args.sequence_parallel, task, jobs)
    choice = None
    if args.vram:  # what the request needs of the GPU, before the weights are looked for (a split: its share)
        tokens = max(video_tokens(job.frames, job.width, job.height) for job in jobs) // split
        choice = generation_choice(task, tokens, args.vram)
    check_weights(args, task)
    return Request(jobs, [], choice, split)
