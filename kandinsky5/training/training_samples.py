"""Sample generation during training, with the generation code itself.

The prompt file (one prompt per line, with --w --h --f --d --s --g --n --i as for generation) is
read and encoded once at the start (the text encoders are then freed); at each sampling point the
DiT being trained (LoRA active, dropout off) samples every prompt and the VAE decodes it into
``output_dir/sample/step<step>/``. Defaults suited to quick checks: 17 frames for video tasks and
20 steps, each overridable per line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from kandinsky5.encoders.prompt_expansion import stored_trigger
from kandinsky5.encoders.vae import load_vae
from kandinsky5.inference.generate import (
    check_expansion,
    decode_tiling,
    encode_images,
    encode_texts,
    job_metadata,
    sample_job,
    write_output,
)
from kandinsky5.inference.jobs import build_jobs
from kandinsky5.model.tasks import TaskPreset
from kandinsky5.training.sample_paths import sample_paths
from modules.sharded_tensors import is_sharded

SAMPLE_FRAMES, SAMPLE_STEPS = 17, 20


class TrainingSampler:
    """``write``: this process decodes and writes the samples. Under FSDP every process samples (the
    sharded DiT runs only with all of them) and only the main one writes."""

    def __init__(self, args: argparse.Namespace, task: TaskPreset, device: torch.device, write: bool = True):
        paths = sample_paths(args, task)
        self.task, self.device, self.folder, self.write = task, device, Path(args.output_dir) / "sample", write
        self.settings = argparse.Namespace(
            from_file=args.sample_prompts,
            output=str(self.folder),
            prompt=None,
            image=None,
            image_last=None,
            loop=False,
            width=None,
            height=None,
            frames=SAMPLE_FRAMES if task.is_video else 1,
            steps=SAMPLE_STEPS,
            guidance=None,
            seed=42,
            negative_prompt=task.negative_prompt,
            scheduler_scale=args.scheduler_scale,
            separate_cfg_passes=False,
            fps=24.0,
            dit=args.dit,
            lora_weight=[],
            lora_multiplier=[],
            text_encoder_qwen=paths["text_encoder_qwen"],
            text_encoder_clip=paths["text_encoder_clip"],
            text_encoder_dtype="bfloat16",
            expand_prompt=bool(getattr(args, "sample_expand_prompt", False)),
        )
        self.jobs = build_jobs(self.settings, task)
        check_expansion(self.settings, self.jobs)  # (any line may ask for expansion: a Qwen without its head is named)
        trigger = stored_trigger(args.trigger_word) if getattr(args, "trigger_word", None) else ""
        self.texts = encode_texts(self.settings, task, self.jobs, device, trigger)
        dtype = getattr(torch, getattr(args, "vae_dtype", None) or "float32")
        self.vae = load_vae(paths["vae"], task.vae, device="cpu", dtype=dtype, task_name=task.name)
        self.offload_dit = getattr(args, "offload_dit_during_sampling", False)
        self.image_latents = encode_images(self.vae, self.jobs)
        decode_tiling(self.vae, args)

    @torch.no_grad()
    def sample(self, dit, network, step: int, tracker=None) -> list[Path]:
        network.eval()
        self.vae.model.to(self.device)
        written = []
        for job, texts, image_latents in zip(self.jobs, self.texts, self.image_latents, strict=True):
            latent = sample_job(dit, self.task, job, texts, image_latents, self.settings, self.device)
            if not self.write:
                continue
            movable = self.offload_dit and dit.block_swap is None and not is_sharded(next(dit.parameters()))
            if movable:
                dit.to("cpu")
            pixels = self.vae.decode(latent)[0].float()
            if movable:
                dit.to(self.device)
            path = self.folder / f"step{step:08d}" / job.output.name
            write_output(path, pixels, self.settings.fps, {**job_metadata(self.settings, self.task, job), "step": step})
            written.append(path)
            if tracker is not None:
                first_frame = ((pixels[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
                tracker(f"sample/{job.index:03d}", path, first_frame, step, video=pixels.shape[1] > 1)
        self.vae.model.to("cpu")
        network.train()
        if self.write:
            tqdm.write(f"samples of step {step} in {self.folder / f'step{step:08d}'}")
        return written
