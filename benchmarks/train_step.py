"""Seconds per LoRA optimizer step and peak resident memory, with and without gradient checkpointing.

A Lite-width DiT (k5-lite-t2v-5s-sd dimensions, random bf16 weights), LoRA rank 16 on the standard
targets (fp32, AdamW), one sample of 2 latent frames of 16x16 latents and 32 text tokens, the real
training loss. Each configuration runs in its own process.

    python benchmarks/train_step.py [--steps 2] [--device cpu]
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

from kandinsky5.model.tasks import get_task  # noqa: E402
from kandinsky5.training.train import training_loss  # noqa: E402
from networks.lora_kandinsky import create_network  # noqa: E402


class TimestepArgs:
    timestep_sampling, sigmoid_scale, discrete_flow_shift, logit_mean, logit_std = "uniform", 1.0, 1.0, 0.0, 1.0
    min_timestep, max_timestep = 0.0, 1000.0


def child(args: argparse.Namespace) -> None:
    task = get_task(args.task)
    dit = build("ours", args.task, args.device)
    dit.gradient_checkpointing = args.checkpointing == "yes"
    network = create_network(dit, 16, 16)
    network.apply_to(dit)
    network.to(args.device).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    params = task.dit_params
    g = torch.Generator().manual_seed(0)
    batch = {
        "latents": torch.randn(1, args.frames, args.side, args.side, 16, generator=g),
        "text": torch.randn(1, 32, params["in_text_dim"], generator=g).bfloat16(),
        "text_mask": torch.ones(1, 32, dtype=torch.bool),
        "pooled": torch.randn(1, params["in_text_dim2"], generator=g).bfloat16(),
    }
    Path("/proc/self/clear_refs").write_text("5")
    times = []
    for _ in range(args.steps + 1):  # the first step is a warm-up
        start = time.perf_counter()
        loss = training_loss(dit, batch, task, TimestepArgs, args.device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    print(json.dumps({"per_step": times[1:], "peak_kib": rss_kib("VmHWM")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--frames", type=int, default=2, help="latent frames")
    parser.add_argument("--side", type=int, default=16, help="latent height and width")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--task", default="k5-lite-t2v-5s-sd")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", choices=["yes", "no"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(
        f"{args.task} dims, LoRA rank 16, {args.frames} latent frames of {args.side}x{args.side}, 32 text tokens, "
        f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'gradient checkpointing':<24} {'s/step':>8} {'peak RSS':>10}")
    for checkpointing in ("no", "yes"):
        command = child_command(
            __file__,
            child=True,
            checkpointing=checkpointing,
            steps=args.steps,
            frames=args.frames,
            side=args.side,
            device=args.device,
            task=args.task,
        )
        result = child_result(command)
        step = sum(result["per_step"]) / len(result["per_step"])
        print(f"{checkpointing:<24} {step:>8.2f} {result['peak_kib'] / 2**20:>8.2f} GiB")


if __name__ == "__main__":
    main()
