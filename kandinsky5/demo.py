"""Run the DiT of a task preset once on random weights and print what goes in and out.

    python -m kandinsky5.demo --task tiny-t2v

A smoke test of an installation that needs no downloaded weights. The real generation command is
kandinsky5_generate_video.py.
"""

from __future__ import annotations

import argparse
import time

import torch

from .attention import AttentionBackendError
from .cli import add_attention_arguments, add_task_argument, attention_backend
from .dit import DiffusionTransformer3D


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_task_argument(parser, default="tiny-t2v")
    parser.add_argument("--frames", type=int, default=None, help="pixel frames, 4k+1 (default: the task's)")
    parser.add_argument("--size", type=int, default=None, help="pixel side of a square frame (default: the task's)")
    parser.add_argument("--text_tokens", type=int, default=16, help="length of the random text sequence")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    add_attention_arguments(parser)
    args = parser.parse_args(argv)

    task = args.task
    frames = args.frames or task.frames
    if (frames - 1) % 4:
        parser.error(f"--frames must be 4k+1 (1, 5, 9, ...), got {frames}")
    size = args.size or task.resolution
    if size % task.size_multiple:
        parser.error(f"--size must be a multiple of {task.size_multiple} for task {task.name}, got {size}")

    torch.manual_seed(args.seed)
    model = DiffusionTransformer3D(**task.dit_params).eval()
    try:
        model.set_attention_backend(attention_backend(args))
    except AttentionBackendError as error:
        parser.error(str(error))
    if task.nabla is not None:
        print(f"note: task {task.name} uses NABLA sparse attention, which is not implemented yet; running dense")
    params = task.dit_params
    latent_frames, latent_side = (frames - 1) // 4 + 1, size // 8
    x = torch.randn(1, latent_frames, latent_side, latent_side, model.in_channels)
    text = torch.randn(1, args.text_tokens, params["in_text_dim"])
    pooled = torch.randn(1, params["in_text_dim2"])
    start = time.perf_counter()
    with torch.no_grad():
        out = model(x, text, pooled, torch.tensor([1000.0]), rope_scale=task.rope_scale)
    seconds = time.perf_counter() - start
    count = sum(p.numel() for p in model.parameters())
    print(f"task {task.name}: DiT with {count:,} parameters, attention backend {model.attention_backend}")
    print(f"input latents {tuple(x.shape)} ({frames} frames of {size}x{size} px), text {tuple(text.shape)}")
    print(f"output velocity {tuple(out.shape)} in {seconds:.3f} s, finite: {bool(out.isfinite().all())}")


if __name__ == "__main__":
    main()
