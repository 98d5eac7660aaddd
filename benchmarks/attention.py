"""Dense attention against NABLA at growing token counts: time and peak memory of one self-attention.

Shapes are those of Lite (28 heads of 64) on frames of 16 x 16 tokens (256 x 256 px), 1 to N
latent frames, NABLA with P = 0.9 and the standard window. On CUDA NABLA runs the compiled
block-sparse kernel; on a CPU it runs the exact dense-masked path, so the CPU figures show the cost
of computing the block map and the mask, not sparsity.

    python benchmarks/attention.py [--device cuda] [--frames 1 2 4 8]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kandinsky5.nabla import nabla_attention  # noqa: E402
from kandinsky5.tasks import NablaParams  # noqa: E402


def measure(function, device: str, runs: int) -> tuple[float, float]:
    """(median seconds, peak GiB above the start) of ``function()``; CPU memory is not measured."""
    cuda = device.startswith("cuda")
    times = []
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
    peak = (torch.cuda.max_memory_allocated() - start_memory) / 2**30 if cuda else float("nan")
    return statistics.median(times[1:]), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    grid_side, heads, head_dim = 16, 28, 64
    print(f"device {args.device}, torch {torch.__version__}, {dtype}, Lite heads, {grid_side}x{grid_side} tokens/frame")
    print(f"{'tokens':>8} {'dense s':>9} {'NABLA s':>9} {'dense GiB':>10} {'NABLA GiB':>10}")
    for frames in args.frames:
        tokens = frames * grid_side * grid_side
        q, k, v = (torch.randn(1, tokens, heads, head_dim, device=args.device, dtype=dtype) for _ in range(3))

        grid = (frames, grid_side, grid_side)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        dense_s, dense_gib = measure(partial(F.scaled_dot_product_attention, qt, kt, vt), args.device, args.runs)
        nabla = partial(nabla_attention, q, k, v, grid, NablaParams(P=0.9))
        nabla_s, nabla_gib = measure(nabla, args.device, args.runs)
        print(f"{tokens:>8} {dense_s:>9.3f} {nabla_s:>9.3f} {dense_gib:>10.3f} {nabla_gib:>10.3f}")


if __name__ == "__main__":
    main()
