"""Seconds per sampling step and peak resident memory of generation, with and without batched CFG.

Runs the real denoiser (DiT + classifier-free guidance + Euler) on random weights: the tiny preset
and a Lite-width DiT (k5-lite-t2v-5s-sd, bf16), at a small size (2 latent frames of 16x16 latents
by default) with prompts of 40 and 12 tokens. Each configuration runs in its own process so its
peak RSS is its own.

    python benchmarks/generate.py [--steps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_forward import build, child_command, child_result, rss_kib  # noqa: E402

from kandinsky5.inference.denoiser import Denoiser, TextCondition, t2v_channels  # noqa: E402
from kandinsky5.inference.sampling import flow_schedule, sample_euler  # noqa: E402
from kandinsky5.model.tasks import get_task  # noqa: E402


def condition(length: int, task_name: str, device: str, seed: int) -> TextCondition:
    params = get_task(task_name).dit_params
    g = torch.Generator().manual_seed(seed)
    return TextCondition(
        torch.randn(1, length, params["in_text_dim"], generator=g).to(device, torch.bfloat16),
        torch.ones(1, length, dtype=torch.bool, device=device),
        torch.randn(1, params["in_text_dim2"], generator=g).to(device, torch.bfloat16),
    )


def child(args: argparse.Namespace) -> None:
    task = get_task(args.task)
    model = build("ours", args.task, args.device)
    shape = (1, args.frames, args.side, args.side)
    denoiser = Denoiser(
        model,
        condition(40, args.task, args.device, 1),
        condition(12, args.task, args.device, 2),
        task.guidance,
        task.rope_scale,
        t2v_channels(shape, args.device),
        batched_cfg=args.batched == "yes",
    )
    noise = torch.randn(*shape, 16, device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    Path("/proc/self/clear_refs").write_text("5")
    stamps = []
    with torch.no_grad():
        sample_euler(
            denoiser,
            noise,
            flow_schedule(args.steps + 1, task.scheduler_scale, args.device),
            callback=lambda i, x: (sync(), stamps.append(time.perf_counter())),
        )
    per_step = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]  # the first step is a warm-up
    print(json.dumps({"per_step": per_step, "peak_kib": rss_kib("VmHWM")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--frames", type=int, default=2, help="latent frames")
    parser.add_argument("--side", type=int, default=16, help="latent height and width")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", nargs="*", default=["tiny-t2v", "k5-lite-t2v-5s-sd"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--batched", choices=["yes", "no"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(
        f"{args.frames} latent frames of {args.side}x{args.side}, CFG on, {args.steps} timed steps, "
        f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'task':<20} {'CFG passes':<12} {'s/step':>8} {'peak RSS':>10}")
    for task in args.tasks:
        for batched in ("yes", "no"):
            command = child_command(
                __file__,
                child=True,
                task=task,
                batched=batched,
                steps=args.steps,
                frames=args.frames,
                side=args.side,
                device=args.device,
            )
            result = child_result(command)
            step = sum(result["per_step"]) / len(result["per_step"])
            label = "batched" if batched == "yes" else "separate"
            print(f"{task:<20} {label:<12} {step:>8.3f} {result['peak_kib'] / 2**20:>8.2f} GiB")


if __name__ == "__main__":
    main()
