"""Dense attention against NABLA at growing token counts: time and peak memory of one self-attention.

Shapes are those of Lite (28 heads of 64) on frames of 32 x 48 tokens (512 x 768 px), 1 to N
latent frames, NABLA with P = 0.9 and the standard window. On CUDA NABLA runs the compiled
block-sparse kernel; on a CPU the gathered block-sparse path. Random queries and keys spread their
attention evenly, so P = 0.9 keeps most blocks; the "kept" column gives the fraction of key blocks
kept, and --P a smaller mass to see how the cost follows it. Peak memory: allocated GPU memory on
CUDA, anonymous resident memory (sampled every 5 ms) on a CPU.

    python benchmarks/attention.py [--device cuda] [--frames 1 2 4 8] [--P 0.9]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory import PeakSampler  # noqa: E402

from kandinsky5.model.nabla import TILE, block_map, nabla_attention, sta_mask  # noqa: E402
from kandinsky5.model.tasks import NablaParams  # noqa: E402


def measure(function, device: str, runs: int) -> tuple[float, float]:
    """(median seconds, peak GiB above the start) of ``function()``."""
    cuda = device.startswith("cuda")
    times = []
    sampler = None if cuda else PeakSampler()
    start_memory = sampler.reset() if sampler else 0
    for _ in range(runs + 1):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_memory = torch.cuda.memory_allocated()
        begin = time.perf_counter()
        function()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated() if cuda else sampler.stop()
    return statistics.median(times[1:]), (peak - start_memory) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--P", type=float, default=0.9, help="NABLA's attention mass kept per query block")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    (grid_h, grid_w), heads, head_dim = (32, 48), 28, 64
    print(f"device {args.device}, torch {torch.__version__}, {dtype}, Lite heads, {grid_h}x{grid_w} tokens/frame")
    print(f"{'tokens':>8} {'kept':>6} {'dense s':>9} {'NABLA s':>9} {'dense GiB':>10} {'NABLA GiB':>10}")
    for frames in args.frames:
        tokens = frames * grid_h * grid_w
        q, k, v = (torch.randn(1, tokens, heads, head_dim, device=args.device, dtype=dtype) for _ in range(3))

        grid = (frames, grid_h, grid_w)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        dense_s, dense_gib = measure(partial(F.scaled_dot_product_attention, qt, kt, vt), args.device, args.runs)
        config = NablaParams(P=args.P)
        sta = sta_mask(frames, grid_h // TILE, grid_w // TILE, config.wT, config.wH, config.wW, args.device)
        kept = block_map(q, k, sta, config).float().mean().item()
        nabla_s, nabla_gib = measure(partial(nabla_attention, q, k, v, grid, config), args.device, args.runs)
        print(f"{tokens:>8} {kept:>6.0%} {dense_s:>9.3f} {nabla_s:>9.3f} {dense_gib:>10.3f} {nabla_gib:>10.3f}")


if __name__ == "__main__":
    main()
