"""Generation: prompts (and images) in, videos and images out, in stages that each hold one model.

1. text: Qwen2.5-VL and CLIP encode every prompt and negative prompt, then are freed;
2. images (I2V, I2I): the VAE encodes the first frames / source images;
3. sampling: the DiT (with LoRAs merged in fp32) denoises each job's seeded noise;
4. decoding: the VAE turns the latents into frames (in overlapping tiles unless --no_vae_tiling),
   written as .mp4 or .png with metadata.

So peak memory is the largest stage, not the sum. ``--latent_path`` runs stage 4 alone. Launched as
several processes (--sequence_parallel), the first one runs stages 1, 2 and 4 and all of them stage 3
(kandinsky5/inference/processes.py).
"""

from __future__ import annotations

import argparse
import gc
import json
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from kandinsky5.encoders.prompt_expansion import expand_prompt, with_trigger
from kandinsky5.encoders.prompt_templates import template_for
from kandinsky5.encoders.text_encoders import QWEN_MODEL, lm_head_missing, load_prompt_encoder
from kandinsky5.encoders.vae import load_vae
from kandinsky5.inference.denoiser import (
    Denoiser,
    TextCondition,
    i2i_channels,
    i2v_channels,
    t2v_channels,
    with_last_frame,
)
from kandinsky5.inference.jobs import (
    GenerationError,
    Job,
    Request,
    first_given,
    latent_file,
    prepare_request,
)
from kandinsky5.inference.magcache import magcache_for
from kandinsky5.inference.media import (
    IMAGE_EXTENSIONS,
    image_to_pixels,
    load_image,
    pixels_to_frames,
    resize_and_crop,
    write_image,
    write_video,
)
from kandinsky5.inference.processes import (
    is_first_process,
    leave_processes,
    quiet_unless_first,
    share_from_first,
    start_processes,
)
from kandinsky5.inference.sampling import flow_schedule, sample_euler
from kandinsky5.model.attention import attention_backend
from kandinsky5.model.checkpoint import check_architecture, checkpoint_files, expected_shapes, load_dit, read_layout
from kandinsky5.model.dtypes import DTYPES
from kandinsky5.model.memory_presets import apply_choice
from kandinsky5.model.nabla import nabla_params
from kandinsky5.model.sequence_parallel import SequenceSplit
from kandinsky5.model.tasks import TASKS, TaskPreset
from modules.atomic_save import save_safetensors_atomic
from networks.lora_files import read_lora
from networks.lora_merge import merge_plan


def free() -> None:
    """Give the memory of what the caller just deleted back (its names must be gone: ``del`` them first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_expansion(args, jobs: list[Job]) -> None:
    """Before anything loads: prompt expansion needs a Qwen with its language-model head. Without one,
    --expand_prompt is an error; expansion by default (or a prompt line's --expand on) is a note, and
    the prompts are encoded as typed."""
    if not any(job.expand_prompt for job in jobs):
        return
    why = lm_head_missing(args.text_encoder_qwen)
    if why is None:
        return
    if args.expand_prompt is True:
        raise GenerationError(
            f"prompt expansion needs Qwen's language-model head: {why}. Use the full {QWEN_MODEL} folder, or "
            "generate with --no_expand_prompt (the prompt is then encoded as typed)"
        )
    print(
        f"note: prompts are encoded as typed, not expanded as the official pipelines do: {why}. "
        "--no_expand_prompt silences this note"
    )
    for job in jobs:
        job.expand_prompt = False


def lora_trigger(args, loras: list) -> str:
    """The trigger words of the LoRAs (their ``trigger`` metadata, in order), or --lora_trigger's text."""
    given = getattr(args, "lora_trigger", None)
    if given is not None:
        return given
    return "".join(lora.metadata.get("trigger", "") for lora, _ in loras)


def encoded_prompt(encoder, task: TaskPreset, job: Job, trigger: str) -> str:
    """The prompt that gets encoded: the typed one, or (expansion on) the trigger and Qwen's rewrite."""
    if not job.expand_prompt:
        return job.prompt
    image = load_image(job.image) if job.image else None
    job.expanded_prompt = with_trigger(trigger, expand_prompt(encoder.qwen, task.kind, job.prompt, image, job.seed))
    tqdm.write(f"expanded prompt {job.index + 1}: {job.expanded_prompt}")
    return job.expanded_prompt


def encode_texts(
    args, task: TaskPreset, jobs: list[Job], device, trigger: str = ""
) -> list[tuple[TextCondition, TextCondition | None]]:
    encoder = load_prompt_encoder(
        args.text_encoder_qwen, args.text_encoder_clip, task.dit_params, device, args.text_encoder_dtype
    )
    conditions = []
    for job in tqdm(jobs, desc="encoding prompts", disable=len(jobs) < 2):
        template = template_for(task.kind, job.frames, with_image=bool(job.image))
        images = None
        if task.kind == "i2i" and job.image:  # Qwen sees the source image at half the output size
            images = [resize_and_crop(load_image(job.image), job.width // 2, job.height // 2)]
        prompt = encoded_prompt(encoder, task, job, trigger)
        prompts = [prompt] + ([job.negative_prompt] if abs(job.guidance - 1.0) > 1e-6 else [])
        encoded = [encoder.encode([p], template, task.qwen_max_length, images) for p in prompts]
        texts = [TextCondition(e.embeddings.cpu(), e.mask.cpu(), e.pooled.cpu()) for e in encoded]
        conditions.append((texts[0], texts[1] if len(texts) > 1 else None))
    del encoder
    free()
    return conditions


def encode_image(vae, path: str | None, job: Job) -> torch.Tensor | None:
    if not path:
        return None
    pixels = image_to_pixels(resize_and_crop(load_image(path), job.width, job.height))
    generator = torch.Generator().manual_seed(job.seed)  # the posterior sample is seeded too
    return vae.encode(pixels, generator=generator).cpu()


def encode_images(vae, jobs: list[Job]) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Per job: the latent of its image (I2V first frame, I2I source) and of its I2V last frame (each
    encoded alone at the job's size, seeded with the job's seed: with --loop the two are equal)."""
    return [(encode_image(vae, job.image, job), encode_image(vae, job.image_last, job)) for job in jobs]


def lora_multipliers(args) -> list[float]:
    """One multiplier per --lora_weight: the given ones, then 1.0."""
    given = list(args.lora_multiplier or [])
    return given + [1.0] * (len(args.lora_weight or []) - len(given))


def load_generation_dit(args, task: TaskPreset, device, loras: list):
    """The DiT with the LoRAs ((file, multiplier) pairs) merged in fp32 while loading, before any fp8
    quantization."""
    shapes = {k[: -len(".weight")]: s for k, s in expected_shapes(task.dit_params).items() if len(s) == 2}
    deltas = merge_plan(loras, shapes)
    load_device = "cpu" if args.blocks_to_swap else device  # swapped blocks stay in CPU memory
    model = load_dit(args.dit, task, device=load_device, dtype=DTYPES[args.dtype], fp8=args.fp8_base, deltas=deltas)
    if args.blocks_to_swap:
        print(f"block swap: {model.enable_block_swap(args.blocks_to_swap, device)} blocks in CPU memory")
    for lora, multiplier in loras:
        print(f"merged LoRA {lora.path} x {multiplier:g} into {len(lora.modules)} layers")
    print(f"attention: {model.set_attention_backend(attention_backend(args))}")
    if args.compile:
        model.compile_blocks()
    return model.eval()


def initial_noise(job: Job, device) -> torch.Tensor:
    """Seeded noise (1, T, H/8, W/8, 16), drawn in bf16 as the official code does (same values on CUDA)."""
    generator = torch.Generator(device=device).manual_seed(job.seed)
    shape = (1, (job.frames - 1) // 4 + 1, job.height // 8, job.width // 8, 16)
    return torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16).float()


def sample_job(
    dit, task: TaskPreset, job: Job, texts, image_latents, args, device, progress: bool = True
) -> torch.Tensor:
    """``image_latents``: (image latent, last-frame latent), each None when the job has none."""
    image_latent, last_latent = image_latents
    cond, uncond = (
        TextCondition(t.embeddings.to(device), t.mask.to(device), t.pooled.to(device)) if t else None for t in texts
    )
    noise = initial_noise(job, device)
    shape = tuple(noise.shape[:4])
    channels, first_frame = None, None
    if task.kind == "i2v":
        first_frame = image_latent.to(device)
        channels = i2v_channels(shape, device, first_frame if task.image_in_condition else None)
        if last_latent is not None:
            channels = with_last_frame(channels, last_latent.to(device))
    elif task.kind == "i2i":
        channels = i2i_channels(image_latent.to(device)) if image_latent is not None else t2v_channels(shape, device)
    elif dit.in_channels == 33:
        channels = t2v_channels(shape, device)
    denoiser = Denoiser(
        dit,
        cond,
        uncond,
        job.guidance,
        task.rope_scale,
        channels,
        first_frame,
        batched_cfg=not args.separate_cfg_passes,
        nabla=nabla_params(args, task),
        magcache=magcache_for(args, task.name, job.steps, len(dit.visual_transformer_blocks)),
    )
    sigmas = flow_schedule(job.steps, first_given(args.scheduler_scale, task.scheduler_scale), device)
    bar = tqdm(total=job.steps, desc=f"sampling {job.index + 1}", unit="step", disable=not progress)
    with bar, torch.no_grad():
        latent = sample_euler(denoiser, noise, sigmas, callback=lambda i, x: bar.update(1))
    if denoiser.magcache is not None:
        print(denoiser.magcache.summary())
    return denoiser.finish(latent).cpu()


def job_metadata(args, task: TaskPreset, job: Job) -> dict:
    values = asdict(job)
    values.pop("output")
    values.pop("index")
    loras = [
        {"path": str(p), "multiplier": m} for p, m in zip(args.lora_weight or [], lora_multipliers(args), strict=True)
    ]
    return {
        **values,
        "task": task.name,
        "fps": args.fps,
        "dit": str(args.dit),
        "loras": loras,
        "scheduler_scale": first_given(args.scheduler_scale, task.scheduler_scale),
    }


def write_output(path: Path, pixels: torch.Tensor, fps: float, metadata: dict) -> None:
    frames = pixels_to_frames(pixels)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        write_image(path, frames[0], metadata)
    else:
        write_video(path, frames, fps, metadata)
    print(f"wrote {path}")


def save_latent(path: Path, latent: torch.Tensor, metadata: dict) -> None:
    save_safetensors_atomic({"latent": latent}, path, metadata={"kandinsky5": json.dumps(metadata)})
    print(f"wrote {path}")


def decode_tiling(vae, args) -> None:
    """Tiled decoding unless --no_vae_tiling (set after any image was encoded: those stay in one piece)."""
    print(vae.set_decode_tiling(args.vae_tiling, args.vae_tile_size, args.vae_tile_frames))


def decode_latent_files(args, task: TaskPreset, device, latents: list[tuple[torch.Tensor, dict]]) -> None:
    vae = load_vae(args.vae, task.vae, device=device, dtype=DTYPES[args.vae_dtype], task_name=task.name)
    decode_tiling(vae, args)
    for path, (latent, metadata) in zip(args.latent_path, latents, strict=True):
        made_with = TASKS.get(metadata["task"])
        if made_with is not None and made_with.vae != task.vae:
            raise GenerationError(
                f"{path} was made with task {made_with.name!r}, whose latents need the "
                f"{made_with.vae} VAE; task {task.name!r} decodes with {task.vae}"
            )
        default = Path(path).with_suffix(".mp4" if latent.shape[1] > 1 else ".png")
        output = Path(args.output) if args.output and len(args.latent_path) == 1 else default
        write_output(output, vae.decode(latent)[0], metadata.get("fps", args.fps), metadata)


def generate(args: argparse.Namespace, task: TaskPreset, request: Request | None = None) -> None:
    """Run the request (checked by prepare_request(): the script does it before importing this module)."""
    request = request or prepare_request(args, task)
    split = start_processes(args, request.sequence_parallel) if request.sequence_parallel > 1 else None
    with quiet_unless_first():
        run_request(args, task, request, split)


def prepare_inputs(args, task: TaskPreset, jobs: list[Job], loras: list, device):
    """Stages 1 and 2: each job's (cond, uncond) texts and (image, last frame) latents, and the VAE if it
    was loaded for the images (left in CPU memory)."""
    check_expansion(args, jobs)
    trigger = lora_trigger(args, loras)
    if trigger and not any(job.expand_prompt for job in jobs):
        print(
            f"note: the trigger words {trigger!r} go before expanded prompts only (as in the official pipelines); "
            "with --no_expand_prompt, write them into your prompt"
        )
    text_device = torch.device(args.text_encoder_device or args.device)
    texts = encode_texts(args, task, jobs, text_device, trigger)
    vae = None
    if any(job.image for job in jobs):
        vae = load_vae(args.vae, task.vae, device=device, dtype=DTYPES[args.vae_dtype], task_name=task.name)
        image_latents = encode_images(vae, jobs)
        vae.model.to("cpu")
    else:
        image_latents = [(None, None)] * len(jobs)
    return texts, image_latents, vae


def run_request(args, task: TaskPreset, request: Request, split: SequenceSplit | None) -> None:
    device = torch.device(args.device)
    first = split is None or is_first_process()
    if args.latent_path:
        if first:
            decode_latent_files(args, task, device, request.latents)
        if split is not None:
            leave_processes()
        return
    jobs = request.jobs
    if request.vram_choice is not None:
        print(apply_choice(args, request.vram_choice, args.given_options, args.vram))
    # Refuse a wrong DiT or a broken LoRA before the text encoders spend any time (LoRAs are read once, here).
    check_architecture(read_layout(checkpoint_files(args.dit)), task, str(args.dit))
    loras = [(read_lora(path), m) for path, m in zip(args.lora_weight or [], lora_multipliers(args), strict=True)]
    texts, image_latents, vae = prepare_inputs(args, task, jobs, loras, device) if first else (None, None, None)
    if split is not None:  # the first process's encodings (and expanded prompts) in every process
        texts, image_latents, expanded = share_from_first(
            (texts, image_latents, [job.expanded_prompt for job in jobs]) if first else None
        )
        for job, prompt in zip(jobs, expanded, strict=True):
            job.expanded_prompt = prompt

    dit = load_generation_dit(args, task, device, loras)
    if split is not None:
        dit.enable_sequence_parallel(split)
        print(f"sequence parallel: each DiT step's visual tokens split over {split.size} processes")
    latents = [
        sample_job(dit, task, job, texts[i], image_latents[i], args, device, progress=first)
        for i, job in enumerate(jobs)
    ]
    del dit  # the DiT leaves the device before the VAE decodes
    free()
    if split is not None:
        leave_processes()
    if not first:
        return

    if vae is None:
        vae = load_vae(args.vae, task.vae, device=device, dtype=DTYPES[args.vae_dtype], task_name=task.name)
    vae.model.to(device)
    decode_tiling(vae, args)
    for job, latent in zip(jobs, latents, strict=True):
        metadata = job_metadata(args, task, job)
        if args.save_latent:
            save_latent(latent_file(job.output), latent, metadata)
        write_output(job.output, vae.decode(latent)[0], args.fps, metadata)
