"""Peak anonymous memory of loading and running a full-size DiT in bf16 and in fp8, and of
converting it with _make_fp8_ckpt.py; the fp8/bf16 forward time ratio.

Lite (default): writes a Lite-sized checkpoint of random bf16 weights (about 4 GB, streamed to
disk), then runs each case in a process of its own, sampling RssAnon from /proc/self/status every
5 ms in a thread (the checkpoint's pages are page cache, not anonymous memory, and do not count).
Forward: 2 latent frames of 16x16 latents, 32 text tokens.

Pro (--model pro): writes a Pro-sized checkpoint of random bf16 weights (38.6 GB; the values come
from one seeded random pool, which keeps writing it to the disk's speed), loads it with --fp8_base
and runs one forward (256 visual + 32 text tokens), reporting the peak memory against the fp8
weights and the load time. A loader that read the whole file first would need 38.6 GB; bf16 is not
run (it needs that much memory). The checkpoint is deleted afterwards.

    python benchmarks/memory.py [--model lite|pro] [--workdir /tmp] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_forward import child_result  # noqa: E402

from kandinsky5.model.checkpoint import expected_shapes, load_dit  # noqa: E402
from kandinsky5.model.tasks import get_task  # noqa: E402
from modules.safetensors_stream import PlannedTensor, write_streaming  # noqa: E402

TASKS = {"lite": "k5-lite-t2v-5s-sd", "pro": "k5-pro-t2v-5s-sd"}
TASK = TASKS["lite"]
GIB = 2**30
POOL_SIZE = 1 << 26  # values of the Pro checkpoint's random pool (128 MiB in bf16)


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    def __init__(self):
        self.peak, self._running = rss_anon(), True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while self._running:
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.005)

    def reset(self) -> int:
        self.peak = rss_anon()
        return self.peak

    def stop(self) -> int:
        self._running = False
        self._thread.join()
        return max(self.peak, rss_anon())


def write_checkpoint(path: Path, task: str = TASK, pooled: bool = False) -> int:
    """Random bf16 weights for ``task``'s DiT; with ``pooled`` each tensor is a slice (at a seeded
    offset) of one random pool repeated, which costs a copy instead of a random draw per value."""
    generator = torch.Generator().manual_seed(0)
    pool = (torch.randn(POOL_SIZE, generator=generator) * 0.02).bfloat16() if pooled else None

    def values(shape) -> torch.Tensor:
        if pool is None:
            return (torch.randn(shape, generator=generator) * 0.02).bfloat16()
        count = math.prod(shape)
        start = int(torch.randint(POOL_SIZE, (), generator=generator))
        repeats = (start + count) // POOL_SIZE + 1
        return (
            pool.repeat(repeats)[start : start + count].view(shape)
            if repeats > 1
            else pool[start : start + count].view(shape)
        )

    plan = [
        PlannedTensor(name, torch.bfloat16, tuple(shape), lambda shape=shape: values(shape))
        for name, shape in expected_shapes(get_task(task).dit_params).items()
    ]
    write_streaming(path, plan, {})
    return path.stat().st_size


def child(args: argparse.Namespace) -> None:
    sampler = PeakSampler()
    start_anon = sampler.reset()
    if args.child == "convert":
        from kandinsky5.model.fp8_checkpoint import convert_to_fp8

        convert_to_fp8(args.checkpoint, args.output)
        print(json.dumps({"peak": sampler.stop() - start_anon}))
        return
    task = get_task(TASKS[args.model])
    began = time.perf_counter()
    model = load_dit(args.checkpoint, task, dtype=torch.bfloat16, fp8=args.child == "fp8")
    load_s = time.perf_counter() - began
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    load_peak, after_load = sampler.peak - start_anon, sampler.reset() - start_anon
    params = task.dit_params
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 16, 16 * (1 + (args.model == "pro")), 33, generator=g).bfloat16()
    text = torch.randn(1, 32, params["in_text_dim"], generator=g).bfloat16()
    pooled = torch.randn(1, params["in_text_dim2"], generator=g).bfloat16()
    times = []
    with torch.no_grad():
        run = lambda: model(x, text, pooled, torch.tensor([500.0]), rope_scale=(1.0, 2.0, 2.0))  # noqa: E731
        run()  # the peak comes from this one; the sampler thread would slow the timed runs
        forward_peak = sampler.stop() - start_anon
        for _ in range(args.runs):
            begin = time.perf_counter()
            run()
            times.append(time.perf_counter() - begin)
    print(
        json.dumps(
            {
                "weights": weights,
                "load_peak": load_peak,
                "after_load": after_load,
                "forward_peak": forward_peak,
                "forward_s": statistics.median(times),
                "load_s": load_s,
            }
        )
    )


def swap_timing(checkpoint: Path, device: str, counts: list[int], runs: int) -> None:
    """Forward time of the bf16 Lite DiT with 0 and more blocks swapped to CPU memory (meant for CUDA;
    on a CPU it measures the bookkeeping alone)."""
    params = get_task(TASK).dit_params
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 16, 16, 33, generator=g).bfloat16().to(device)
    text = torch.randn(1, 32, params["in_text_dim"], generator=g).bfloat16().to(device)
    pooled = torch.randn(1, params["in_text_dim2"], generator=g).bfloat16().to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    baseline = None
    for count in counts:
        model = load_dit(checkpoint, get_task(TASK), device="cpu" if count else device, dtype=torch.bfloat16)
        if count:
            model.enable_block_swap(count, device)
        times = []
        with torch.no_grad():
            for _ in range(runs + 1):
                sync()
                begin = time.perf_counter()
                model(x, text, pooled, torch.tensor([500.0], device=device), rope_scale=(1.0, 2.0, 2.0))
                sync()
                times.append(time.perf_counter() - begin)
        median = statistics.median(times[1:])
        baseline = baseline or median
        print(f"blocks_to_swap {count:>2}: forward {median:.3f} s ({median / baseline - 1:+.1%} against no swap)")
        del model


def run_child(case: str, checkpoint: Path, runs: int, output: Path | None = None, model: str = "lite") -> dict:
    command = [sys.executable, __file__, "--child", case, "--checkpoint", str(checkpoint), "--runs", str(runs)]
    command += ["--model", model]
    if output:
        command += ["--output", str(output)]
    return child_result(command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", choices=sorted(TASKS), default="lite", help="lite: the full Lite study; pro: Pro with --fp8_base"
    )
    parser.add_argument(
        "--workdir", default=tempfile.gettempdir(), help="where the checkpoint is written (Lite 4 GB, Pro 38.6 GB)"
    )
    parser.add_argument("--runs", type=int, default=3, help="timed forwards per case")
    parser.add_argument("--device", default="cpu", help="cuda: also time forwards with 0/8/16/31 swapped blocks")
    parser.add_argument("--swap_counts", type=int, nargs="*", default=[0, 8, 16, 31], help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["bf16", "fp8", "convert"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.model == "pro":
        pro(args)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        checkpoint = Path(tmp) / "lite_bf16.safetensors"
        size = write_checkpoint(checkpoint)
        print(
            f"Lite DiT checkpoint of random bf16 weights: {size / GIB:.2f} GiB; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        )
        results = {case: run_child(case, checkpoint, args.runs) for case in ("bf16", "fp8")}
        converted = Path(tmp) / "lite_fp8.safetensors"
        conversion = run_child("convert", checkpoint, args.runs, converted)
        largest = max(s[0] * s[1] for s in expected_shapes(get_task(TASK).dit_params).values() if len(s) == 2) * 2
        for case, r in results.items():
            activations = r["forward_peak"] - r["after_load"]
            print(
                f"{case}: weights {r['weights'] / GIB:.2f} GiB, peak anonymous memory while loading "
                f"{r['load_peak'] / GIB:.2f} GiB, with a forward {r['forward_peak'] / GIB:.2f} GiB "
                f"= {r['forward_peak'] / (r['weights'] + activations):.3f} x (weights + activations "
                f"{activations / GIB:.2f} GiB); forward {r['forward_s']:.3f} s"
            )
        print(
            f"fp8/bf16 forward time: {results['fp8']['forward_s'] / results['bf16']['forward_s']:.3f} (target <= 1.5)"
        )
        print(
            f"_make_fp8_ckpt.py: peak anonymous memory {conversion['peak'] / GIB:.3f} GiB, "
            f"{(conversion['peak'] - largest) / GIB:.3f} GiB above the largest tensor ({largest / GIB:.3f} GiB bf16); "
            f"output {converted.stat().st_size / GIB:.2f} GiB"
        )
        if args.device != "cpu":
            swap_timing(checkpoint, args.device, args.swap_counts, args.runs)


def pro(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        checkpoint = Path(tmp) / "pro_bf16.safetensors"
        began = time.perf_counter()
        size = write_checkpoint(checkpoint, TASKS["pro"], pooled=True)
        print(
            f"Pro DiT checkpoint of random bf16 weights: {size / 1e9:.1f} GB ({size / GIB:.2f} GiB) written in "
            f"{time.perf_counter() - began:.0f} s; torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
        r = run_child("fp8", checkpoint, 1, model="pro")  # a Pro forward takes minutes on a CPU
        activations = r["forward_peak"] - r["after_load"]
        print(
            f"--fp8_base: weights {r['weights'] / GIB:.2f} GiB, loaded in {r['load_s']:.0f} s; peak anonymous memory "
            f"while loading {r['load_peak'] / GIB:.2f} GiB = {r['load_peak'] / r['weights']:.3f} x the fp8 weights "
            f"(target <= 1.1), with a forward {r['forward_peak'] / GIB:.2f} GiB (activations {activations / GIB:.2f} "
            f"GiB); forward {r['forward_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
