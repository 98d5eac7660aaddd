"""Training test helpers: a small cached dataset and the common training arguments."""

from __future__ import annotations

from pathlib import Path

import kandinsky5_cache_latents
import kandinsky5_cache_text_encoder_outputs

from .media_factory import caption, write_image, write_video

ROOT = Path(__file__).resolve().parents[1]


def cache_both(tiny_tree: Path, config: Path, task: str, vae: Path) -> None:
    """Run both caching commands on a dataset config for ``task``."""
    common = ["--dataset_config", str(config), "--task", task]
    kandinsky5_cache_latents.main([*common, "--vae", str(vae)])
    encoders = [
        "--text_encoder_qwen",
        str(tiny_tree / "text_encoder"),
        "--text_encoder_clip",
        str(tiny_tree / "text_encoder2"),
    ]
    kandinsky5_cache_text_encoder_outputs.main([*common, *encoders])


def build_cached_dataset(tiny_tree: Path, root: Path) -> tuple[Path, Path, Path]:
    """One 9-frame clip and two images with captions of different lengths, cached for tiny-t2v."""
    (root / "videos").mkdir()
    (root / "images").mkdir()
    caption(write_video(root / "videos" / "clip.mp4", 9, 64, 64), "a red square slides to the right")
    caption(write_image(root / "images" / "one.png", 64, 64, seed=1), "a cat")
    caption(write_image(root / "images" / "two.png", 64, 64, seed=2), "two dogs play in the snow at dusk, wide shot")
    config = root / "data.toml"
    config.write_text(f"""
[general]
resolution = 64
[[datasets]]
video_directory = "{root / "videos"}"
cache_directory = "{root / "cache_video"}"
target_frames = [9]
[[datasets]]
image_directory = "{root / "images"}"
cache_directory = "{root / "cache_images"}"
batch_size = 2
""")
    cache_both(tiny_tree, config, "tiny-t2v", tiny_tree / "vae")
    video_only = root / "video.toml"
    video_only.write_text(f"""
[[datasets]]
video_directory = "{root / "videos"}"
cache_directory = "{root / "cache_video"}"
resolution = 64
target_frames = [9]
""")
    return root, config, video_only


def running_until(command: list[str], saved: Path, timeout: float = 240, **popen):
    """Start a training command and return its process once it has written ``saved`` (still running)."""
    import subprocess
    import time

    popen = {"cwd": ROOT, **popen}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    deadline = time.time() + timeout
    while not saved.exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.1)
    return process


def train_args(tree, config, out, *extra):
    return [
        "--task",
        "tiny-t2v",
        "--dit",
        str(tree / "model/tiny_t2v.safetensors"),
        "--dataset_config",
        str(config),
        "--output_dir",
        str(out),
        "--output_name",
        "lora",
        "--mixed_precision",
        "no",
        "--sdpa",
        "--max_data_loader_n_workers",
        "0",
        *extra,
    ]


def fixed_noise_loss(
    tree: Path,
    config: Path,
    task: str,
    dit_file: str,
    channels,
    lora_file=None,
    multiplier=1.0,
    rope_scale=(1.0, 1.0, 1.0),
) -> float:
    """The flow-matching loss of a config's one cached dataset at fixed noise and timesteps, with the
    LoRA merged; ``channels(batch)`` gives the conditioning channels beside the noisy latent."""
    import torch

    from dataset.config import load_dataset_config
    from dataset.training_data import find_samples, load_batch
    from kandinsky5.model.checkpoint import load_dit
    from kandinsky5.model.tasks import get_task
    from kandinsky5.training.flow_matching import flow_matching_loss, noisy_latents
    from networks.lora_files import read_lora
    from networks.lora_merge import merge_lora

    dit = load_dit(tree / "model" / dit_file, get_task(task), dtype=torch.float32)
    if lora_file:
        merge_lora(dit, read_lora(lora_file), multiplier)
    (entry,) = [find_samples(d) for d in load_dataset_config(config)]
    batch = load_batch(entry.samples)
    g = torch.Generator().manual_seed(123)
    losses = []
    for _ in range(8):
        x0 = batch["latents"]
        noise, t = torch.randn(x0.shape, generator=g), torch.rand(1, generator=g) * 0.8 + 0.1
        x_t = torch.cat([noisy_latents(x0, noise, t), channels(batch)], dim=-1)
        with torch.no_grad():
            prediction = dit(
                x_t, batch["text"], batch["pooled"], t * 1000, text_mask=batch["text_mask"], rope_scale=rope_scale
            )
        losses.append(flow_matching_loss(prediction, x0, noise).item())
    return sum(losses) / len(losses)


def sampling_args(tiny_tree, prompts):
    """The options of samples during training: the prompt file and the tiny tree's encoders and VAE."""
    return [
        "--sample_prompts",
        str(prompts),
        "--text_encoder_qwen",
        str(tiny_tree / "text_encoder"),
        "--text_encoder_clip",
        str(tiny_tree / "text_encoder2"),
        "--vae",
        str(tiny_tree / "vae"),
    ]
