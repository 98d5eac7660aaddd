"""Time one DiT forward, ours against diffusers' Kandinsky5Transformer3DModel, in the same run.

Both models get the same random weights (Lite dimensions by default: model_dim 1792, 32 visual
blocks, bf16 with the fp32 parts each model keeps in fp32) and the same inputs: 2 latent frames of
16x16 latents (128 visual tokens) and 32 text tokens. Each model runs in a child process of its
own, so its peak resident memory is its own. Prints both medians, the ratio ours/diffusers, the
peak RSS of each and how far apart the two outputs are.

    python benchmarks/dit_forward.py [--runs 5] [--task k5-lite-t2v-5s-sd] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kandinsky5.model.dit import DiffusionTransformer3D, keeps_fp32  # noqa: E402
from kandinsky5.model.tasks import get_task  # noqa: E402
from modules.memory import release_freed_memory  # noqa: E402


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child_command(script: str, **options) -> list[str]:
    """``python script --child ... --name value ...`` for a benchmark's measuring child process."""
    command = [sys.executable, script]
    for name, value in options.items():
        if value is False or value is None:
            continue
        command += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return command


def child_result(command: list[str]) -> dict:
    """Run a benchmark child process; its last line of output is a JSON object of its measurements."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"benchmark child failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _draw(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Seeded bf16 weights of ``shape``: N(0, 1) draws scaled by 0.02 (as torch.randn(...) * 0.02)."""
    return torch.empty(shape, dtype=torch.bfloat16).normal_(generator=generator).mul_(0.02)


def build(which: str, task_name: str, device: str) -> torch.nn.Module:
    """The model on ``device`` with seeded random bf16 weights, fp32 where that model keeps fp32."""
    params = dict(get_task(task_name).dit_params)
    if which == "ours":
        with torch.device("meta"):
            model = DiffusionTransformer3D(**params)
        model.allocate_packed_projections(torch.bfloat16, device)  # as load_dit does
        fp32 = keeps_fp32
    else:
        from accelerate import init_empty_weights
        from diffusers import Kandinsky5Transformer3DModel

        params.pop("instruct_type")
        with init_empty_weights():  # parameters on meta; its RoPE tables stay real
            model = Kandinsky5Transformer3DModel(**params)
        keep = Kandinsky5Transformer3DModel._keep_in_fp32_modules
        fp32 = lambda name: any(k in name for k in keep)  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    for name in sorted(dict(model.named_parameters())):
        module_path, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_path)
        slot = module._parameters[leaf]
        dtype = torch.float32 if fp32(name) else torch.bfloat16
        if slot.is_meta and dtype == torch.bfloat16 and torch.device(device).type == "cpu":
            target = _draw(slot.shape, generator)
        else:  # fp32, another device, or a packed projection filled in place
            # the weight's memory comes before its draw's, so freeing the draw leaves no hole in the
            # heap below it (as a checkpoint load leaves none; activations would fill such holes
            # later and count in either side's peak memory)
            target = torch.empty(slot.shape, dtype=dtype, device=device) if slot.is_meta else slot.data
            target.copy_(_draw(slot.shape, generator))
        if slot.is_meta:
            module._parameters[leaf] = torch.nn.Parameter(target, requires_grad=False)
    release_freed_memory()  # the random draws' leftovers are no part of either model's footprint
    return model.eval()


def inputs(task_name: str, device: str, frames: int, side: int, text_len: int):
    params = get_task(task_name).dit_params
    channels = 33 if params["visual_cond"] or params["instruct_type"] else 16
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, frames, side, side, channels, generator=g).to(device, torch.bfloat16)
    text = torch.randn(1, text_len, params["in_text_dim"], generator=g).to(device, torch.bfloat16)
    pooled = torch.randn(1, params["in_text_dim2"], generator=g).to(device, torch.bfloat16)
    time_ = torch.tensor([937.5], device=device)
    return x, text, pooled, time_


def child(args: argparse.Namespace) -> None:
    model = build(args.child, args.task, args.device)
    x, text, pooled, time_ = inputs(args.task, args.device, args.frames, args.side, args.text_tokens)
    rope_scale = get_task(args.task).rope_scale
    if args.child == "ours":
        run = lambda: model(x, text, pooled, time_, rope_scale=rope_scale)  # noqa: E731
    else:
        positions = [torch.arange(n, device=args.device) for n in (args.frames, args.side // 2, args.side // 2)]
        text_pos = torch.arange(args.text_tokens, device=args.device)
        run = lambda: model(x, text, time_, pooled, positions, text_pos, rope_scale).sample  # noqa: E731
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    build_peak = rss_kib("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak so it measures the forwards alone
    with torch.no_grad():
        out = run()  # warm-up
        times = []
        for _ in range(args.runs):
            sync()
            start = time.perf_counter()
            out = run()
            sync()
            times.append(time.perf_counter() - start)
    torch.save(out.float().cpu(), args.output)
    print(json.dumps({"times": times, "build_peak_kib": build_peak, "forward_peak_kib": rss_kib("VmHWM")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="k5-lite-t2v-5s-sd", help="preset whose DiT dimensions to use")
    parser.add_argument("--runs", type=int, default=5, help="timed forwards per model (after one warm-up)")
    parser.add_argument("--frames", type=int, default=2, help="latent frames")
    parser.add_argument("--side", type=int, default=16, help="latent height and width")
    parser.add_argument("--text_tokens", type=int, default=32, help="text sequence length")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    print(f"task {args.task}, {args.frames} latent frames of {args.side}x{args.side}, {args.text_tokens} text tokens")
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.runs} runs")
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("ours", "diffusers"):
            outputs[which] = os.path.join(tmp, f"{which}.pt")
            command = [sys.executable, __file__, "--child", which, "--output", outputs[which]]
            for name in ("task", "runs", "frames", "side", "text_tokens", "device"):
                command += [f"--{name}", str(getattr(args, name))]
            results[which] = child_result(command)
        ours, theirs = torch.load(outputs["ours"]), torch.load(outputs["diffusers"])
    medians = {k: statistics.median(v["times"]) for k, v in results.items()}
    for which in ("ours", "diffusers"):
        r = results[which]
        runs = ", ".join(f"{t:.3f}" for t in r["times"])
        build_gib, forward_gib = r["build_peak_kib"] / 2**20, r["forward_peak_kib"] / 2**20
        print(f"{which:>9}: median {medians[which]:.3f} s (runs {runs})")
        print(f"{'':>9}  peak RSS while building {build_gib:.2f} GiB, during the forwards {forward_gib:.2f} GiB")
    print(f"ratio ours/diffusers: {medians['ours'] / medians['diffusers']:.3f}  (target <= 1.0)")
    relative = ((ours - theirs).norm() / theirs.norm()).item()
    print(f"relative difference of the outputs (bf16, differing only in rounding): {relative:.2e}")


if __name__ == "__main__":
    main()
