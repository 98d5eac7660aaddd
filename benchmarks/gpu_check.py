"""One command for a lent GPU: run every CUDA path once, check it against a reference, print the table.

    python benchmarks/gpu_check.py                       # on CUDA, Lite-sized (a few minutes on an H100/H200)
    python benchmarks/gpu_check.py --device cpu --tiny   # the same checks, tiny, on the CPU (the test suite runs this)

Each check prints ``ok``, ``FAIL`` or ``skip`` with what it compared and the reason for a skip; the
command exits 1 if any check failed. The model has random weights of the task's shape (no download);
references are computed by the same code on a plainer path (fp32 on the CPU, no swap, eager, sdpa):

- bf16 DiT forward on the device against the fp32 CPU forward (tiny shapes only: Lite in fp32 on
  the CPU takes minutes; on CUDA at Lite size the device fp32 forward is the reference);
- every installed attention backend against sdpa;
- block swap with side-stream copies at 0, 8, 16 and 31 blocks (clamped to the model) against no swap,
  forward and LoRA gradients;
- fp8 Linear layers on the device against the dequantized weights;
- NABLA attention (the compiled flex_attention kernel on CUDA) against the gathered-blocks path;
- batch prefetch (pinned memory, side stream) against the batches themselves;
- one fp16 training step through accelerate (its gradient scaler on CUDA): finite, and the step taken;
- ``--compile`` blocks against eager.

Then the timing tables, at the Lite 5 s 512x768 size (31 latent frames of 64x96, 47,616 visual tokens),
bf16, each section guarded so that one failure (out of memory, no compiler) keeps the others' figures:

- seconds per CFG step (a batch of 2), sdpa and the fastest installed exact backend; the official
  Lite figure is 139 s for 50 steps with CFG on an H100 (100 network evaluations), about 2.8 s a CFG step;
- the same step with 0, 8 and 16 blocks swapped to CPU memory (block swap's overhead) and with fp8
  weights, each with the step's peak device memory;
- a Pro LoRA training step with the spec's flags (fp8, 10 blocks swapped, checkpointing) on a 17-frame
  512x512 clip: time and peak memory, against 24 GB and against the --vram estimate;
- every stage's peak memory at the real architectures' widths (benchmarks/stage_memory.py on the
  device: the VAE decodes, Qwen, a DiT step and a LoRA step of Lite, Pro and the image model);
- sequence parallelism over the GPUs found (benchmarks/sequence_parallel.py): a Pro DiT step and LoRA
  step at the Pro 10 s HD length (249,856 tokens, one visual block), memory per GPU and step time with
  the tokens split over 1, 2, 4 and 8 of them.

Needs a CUDA build of torch and the project's own dependencies; no network and no weights. About 5-8
minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kandinsky5.model.attention import BACKENDS, AttentionBackendError, check_backend  # noqa: E402
from kandinsky5.model.dit import DiffusionTransformer3D  # noqa: E402
from kandinsky5.model.nabla import TILE, block_map, gathered_block_attention, nabla_attention, sta_mask  # noqa: E402
from kandinsky5.model.tasks import NablaParams, get_task  # noqa: E402
from modules.fp8 import dequantize_weight, quantize_linears  # noqa: E402
from modules.prefetch import prefetch_to  # noqa: E402
from networks.lora_kandinsky import create_network  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []


def report(name: str, status: str, detail: str) -> None:
    RESULTS.append((name, status, detail))
    print(f"{status:<5} {name}: {detail}", flush=True)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_close(name: str, got: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    error = relative_error(got, expected)
    ok = torch.isfinite(got).all() and error <= tolerance
    report(name, "ok" if ok else "FAIL", f"{what}: relative L2 error {error:.2e} (limit {tolerance:.0e})")


def random_dit(task: str, dtype: torch.dtype, device, seed: int = 0) -> DiffusionTransformer3D:
    torch.manual_seed(seed)
    with torch.device(device):
        model = DiffusionTransformer3D(**get_task(task).dit_params)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    return model.set_compute_dtype(dtype).eval().requires_grad_(False)


def inputs(model: DiffusionTransformer3D, frames: int, height: int, width: int, text: int, device, dtype, batch=1):
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    x = torch.randn(batch, frames, height, width, model.in_channels, generator=g)
    return (
        x.to(device, dtype),
        torch.randn(batch, text, cfg["in_text_dim"], generator=g).to(device, dtype),
        torch.randn(batch, cfg["in_text_dim2"], generator=g).to(device, dtype),
        torch.full((batch,), 500.0, device=device),
    )


def forward(model, args) -> torch.Tensor:
    with torch.no_grad():
        return model(*args)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def installed_backends(device) -> list[str]:
    names = []
    for name in BACKENDS:
        try:
            check_backend(name, device)
            names.append(name)
        except AttentionBackendError as error:
            report(f"attention {name}", "skip", str(error).split(". ")[0])
    return names


def check_forward(task, size, device, dtype, backends: list[str]) -> None:
    model = random_dit(task, dtype, device)
    reference = random_dit(task, torch.float32, "cpu" if size["tiny"] else device)
    args = inputs(model, *size["check"], device, dtype)
    ref_args = tuple(a.to(reference.device, torch.float32) if a.is_floating_point() else a for a in args)
    check_close(
        f"{dtype} forward",
        forward(model, args),
        forward(reference, ref_args),
        0.05,
        f"against fp32 on {reference.device}",
    )
    sdpa = forward(model, args)
    for name in backends:
        model.set_attention_backend(name)
        check_close(f"attention {name}", forward(model, args), sdpa, 0.03, "against sdpa")
    model.set_attention_backend("sdpa")
    if torch.device(device).type == "cuda":
        model.compile_blocks()
        check_close("--compile", forward(model, args), sdpa, 0.03, "compiled blocks against eager")


def check_block_swap(task, size, device, dtype) -> None:
    def run(swapped: int):
        model = random_dit(task, dtype, "cpu" if swapped else device)
        if swapped:
            model.enable_block_swap(swapped, device)
        network = create_network(model, 4, 4, 0.0, None)
        network.apply_to(model)
        network.to(device).train()
        for module in network.loras.values():
            torch.nn.init.normal_(module.lora_up.weight, 0, 0.02, generator=torch.Generator().manual_seed(2))
        model.gradient_checkpointing = True
        out = model(*inputs(model, *size["check"], device, dtype))
        out.float().square().mean().backward()
        grads = torch.cat([p.grad.flatten().cpu() for p in network.parameters() if p.grad is not None])
        return out.detach(), grads

    params = get_task(task).dit_params
    count = params["num_text_blocks"] + params["num_visual_blocks"]
    plain_out, plain_grads = run(0)
    report("block swap 0", "ok", f"the reference: all {count} blocks on {device}")
    for requested in (8, 16, 31):
        swapped = min(requested, count - 1)
        out, grads = run(swapped)
        error = max(relative_error(out, plain_out), relative_error(grads, plain_grads))
        status = "ok" if error <= 1e-3 else "FAIL"
        report(f"block swap {requested}", status, f"{swapped} of {count} blocks swapped: error {error:.1e} vs none")


def check_fp8(device, dtype) -> None:
    holder = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=True, device=device, dtype=dtype))
    quantize_linears(holder, lambda name: True)
    fp8 = holder[0]
    x = torch.randn(4, 256, device=device, dtype=dtype)
    weight = dequantize_weight(fp8.weight, fp8.scale_weight, torch.float32)
    with torch.no_grad():
        got = fp8(x)
    expected = torch.nn.functional.linear(x.float(), weight, fp8.bias.float())
    check_close("fp8 Linear", got, expected, 0.01, f"{fp8.weight.dtype} weights on {device} against fp32 dequantized")


def check_nabla(device, dtype) -> None:
    grid, heads, dim = (2, 16, 16), 2, 64
    tokens = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, tokens, heads, dim, generator=g).to(device, dtype) for _ in range(3))
    config = NablaParams(P=0.7)
    got = nabla_attention(q, k, v, grid, config)
    sta = sta_mask(grid[0], grid[1] // TILE, grid[2] // TILE, config.wT, config.wH, config.wW, str(q.device))
    expected = gathered_block_attention(q, k, v, block_map(q, k, sta, config))
    kernel = "compiled flex_attention" if torch.device(device).type == "cuda" else "gathered blocks (CPU)"
    check_close("NABLA attention", got, expected, 0.02, f"{kernel} against gathered blocks")


def check_prefetch(device) -> None:
    batches = [
        {"latents": torch.randn(2, 3, 4, 4, 16).pin_memory() if torch.cuda.is_available() else torch.randn(2, 3)}
    ]
    batches += [{"latents": torch.randn(2, 3, 4, 4, 16)} for _ in range(2)]
    moved = list(prefetch_to(iter(batches), device))
    same = all(torch.equal(a["latents"], b["latents"].cpu()) for a, b in zip(batches, moved, strict=True))
    on_device = all(b["latents"].device.type == torch.device(device).type for b in moved)
    report("batch prefetch", "ok" if same and on_device else "FAIL", f"{len(moved)} batches on {device}, unchanged")


def check_fp16_step(task, size, device) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="fp16", cpu=torch.device(device).type == "cpu")
    model = random_dit(task, torch.float16, device)
    network = create_network(model, 4, 4, 0.0, None)
    network.apply_to(model)
    network.to(device).train()
    optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(network.parameters(), lr=1e-3), device_placement=False)
    before = [p.detach().clone() for p in network.parameters()]
    with accelerator.autocast():
        loss = model(*inputs(model, *size["check"], device, torch.float16)).float().square().mean()
    accelerator.backward(loss)
    loss = loss.detach()
    accelerator.clip_grad_norm_(list(network.parameters()), 1.0)
    optimizer.step()
    changed = any(not torch.equal(a, p) for a, p in zip(before, network.parameters(), strict=True))
    scaler = "with accelerate's gradient scaler" if accelerator.scaler is not None else "no scaler on this device"
    ok = torch.isfinite(loss) and (changed or optimizer.step_was_skipped)
    report("fp16 training step", "ok" if ok else "FAIL", f"{scaler}; loss {loss.item():.4f}, step taken: {changed}")


def timed_step(model, args, device, runs: int) -> tuple[float, float]:
    """Median seconds of a forward of ``args`` and the device's peak memory during it, in GiB."""
    forward(model, args)  # warm-up
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        forward(model, args)
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else float("nan")
    return statistics.median(times), peak


def time_cfg_step(task, size, device, runs: int, backends: list[str]) -> None:
    model = random_dit(task, torch.bfloat16, device)
    args = inputs(model, *size["time"], device, torch.bfloat16, batch=2)
    backends = ["sdpa"] + [b for b in backends if b not in ("sdpa", "sage")][:1]  # sage is not exact
    tokens = size["time"][0] * size["time"][1] * size["time"][2] // 4
    print(f"\n| attention | seconds per CFG step (batch 2, {tokens} visual tokens, bf16) | peak GiB |\n|---|---|---|")
    for name in backends:
        model.set_attention_backend(name)
        seconds, peak = timed_step(model, args, device, runs)
        print(f"| {name} | {seconds:.3f} | {peak:.2f} |", flush=True)


def time_memory_options(task, size, device, runs: int) -> None:
    """The CFG step with blocks swapped to CPU memory and with fp8 weights, against the plain one."""
    print("\n| DiT weights | seconds per CFG step | against bf16, no swap | peak GiB |\n|---|---|---|---|")
    params = get_task(task).dit_params
    count = params["num_text_blocks"] + params["num_visual_blocks"]
    baseline = None
    for name, swapped, fp8 in (("bf16", 0, False), ("bf16, 8 swapped", 8, False), ("bf16, 16 swapped", 16, False),
                               ("fp8", 0, True), ("fp8, 16 swapped", 16, True)):  # fmt: skip
        try:
            model = random_dit(task, torch.bfloat16, "cpu" if swapped or fp8 else device)
            if fp8:
                quantize_linears(model, lambda layer: "transformer_blocks." in layer)
            if swapped:
                model.enable_block_swap(min(swapped, count - 1), device)
            elif fp8:
                model.to(device)
            model.set_attention_backend("sdpa")
            seconds, peak = timed_step(
                model, inputs(model, *size["time"], device, torch.bfloat16, batch=2), device, runs
            )
            baseline = baseline or seconds
            print(f"| {name} | {seconds:.3f} | {seconds / baseline:.2f}x | {peak:.2f} |", flush=True)
            del model
        except Exception as error:  # out of memory, say: the other rows still count
            print(f"| {name} | failed: {type(error).__name__}: {str(error)[:120]} | | |", flush=True)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def pro_training_step(device, tiny: bool) -> None:
    """A Pro LoRA training step with the spec's flags (--fp8_base --blocks_to_swap 10
    --gradient_checkpointing; rank 16, AdamW) on a 17-frame 512x512 clip: its time and peak device memory,
    against 24 GB and against the --vram preset's estimate for the same options."""
    from kandinsky5.model.memory_presets import GIB, training_step_peak

    task, size, swapped = ("tiny-pro-t2v", (3, 8, 8, 16), 3) if tiny else ("k5-pro-t2v-5s-sd", (5, 64, 64, 128), 10)
    model = random_dit(task, torch.bfloat16, "cpu")
    quantize_linears(model, lambda layer: "transformer_blocks." in layer)
    model.enable_block_swap(swapped, device)
    model.gradient_checkpointing = True
    network = create_network(model, 16, 16.0, 0.0, None)
    network.apply_to(model)
    network.to(device).train()
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-4)
    args = inputs(model, *size, device, torch.bfloat16)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    model(*args).float().square().mean().backward()
    optimizer.step()
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens = size[0] * size[1] * size[2] // 4
    estimate = training_step_peak(get_task(task), tokens, True, swapped, False) / GIB
    if torch.device(device).type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / GIB
        fits = "within" if peak <= 24 else "above"
        report("Pro LoRA step, the spec's flags", "ok", f"{seconds:.1f} s, peak {peak:.2f} GiB ({fits} 24 GiB; "
               f"--vram estimate {estimate:.2f} GiB), {tokens} tokens")  # fmt: skip
    else:
        report("Pro LoRA step, the spec's flags", "ok", f"{seconds:.1f} s on {device} (peak memory on CUDA only)")


def stage_figures(device, tiny: bool) -> None:
    """benchmarks/stage_memory.py's plan on this device (each case in its own process)."""
    import subprocess

    if tiny:
        report("stage memory", "skip", "full-size stages only (python benchmarks/stage_memory.py)")
        return
    script = Path(__file__).with_name("stage_memory.py")
    done = subprocess.run([sys.executable, str(script), "--device", str(device)], capture_output=True, text=True)
    print(done.stdout, flush=True)
    report("stage memory", "ok" if done.returncode == 0 else "FAIL", done.stderr.strip()[-300:] or "every stage ran")


def sequence_parallel_figures(device, tiny: bool) -> None:
    """benchmarks/sequence_parallel.py over the GPUs found (1, 2, 4, 8 processes, as many as there are
    GPUs): a Pro DiT step and LoRA step (one visual block) at the Pro 10 s HD length, 249,856 tokens,
    peak memory per process and step time. Tiny: the script itself, two CPU processes."""
    import subprocess

    script = Path(__file__).with_name("sequence_parallel.py")
    if tiny:
        options = ["--model", "tiny-pro-t2v", "--device", "cpu", "--processes", "1", "2", "--latent", "1", "16", "16",
                   "--modes", "generate"]  # fmt: skip
    else:
        gpus = torch.cuda.device_count()
        counts = [str(n) for n in (1, 2, 4, 8) if n <= gpus]
        options = ["--device", "cuda", "--processes", *counts, "--latent", "61", "128", "128"]
    done = subprocess.run([sys.executable, str(script), *options], capture_output=True, text=True)
    print(done.stdout, flush=True)
    status = "ok" if done.returncode == 0 else "FAIL"
    report("sequence parallel", status, done.stderr.strip()[-300:] if done.returncode else "every split ran")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny model and sizes (what the test suite runs on the CPU)"
    )
    parser.add_argument("--runs", type=int, default=3, help="timed CFG steps (median printed; default 3)")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}; needs a CUDA build of torch on a GPU")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; run with --device cpu --tiny to check the script itself")
    device = torch.device(args.device)
    if args.tiny:
        task, size = "tiny-t2v", {"tiny": True, "check": (2, 8, 8, 7), "time": (3, 16, 16, 16)}
    else:  # checks on 2 latent frames of 32x48; timing at Lite 5 s 512x768 (31 frames of 64x96)
        task, size = "k5-lite-t2v-5s-sd", {"tiny": False, "check": (2, 32, 48, 64), "time": (31, 64, 96, 128)}
    dtype, backends = torch.bfloat16, installed_backends(device)
    started = time.perf_counter()
    for check in (
        lambda: check_forward(task, size, device, dtype, backends),
        lambda: check_block_swap(task, size, device, dtype),
        lambda: check_fp8(device, dtype),
        lambda: check_nabla(device, dtype),
        lambda: check_prefetch(device),
        lambda: check_fp16_step(task, size, device),
    ):
        try:
            check()
        except Exception as error:  # one broken path must not hide the others' results
            report("check", "FAIL", f"{type(error).__name__}: {error}")
    for section in (
        lambda: time_cfg_step(task, size, device, args.runs, backends),
        lambda: time_memory_options(task, size, device, args.runs),
        lambda: pro_training_step(device, size["tiny"]),
        lambda: stage_figures(device, size["tiny"]),
        lambda: sequence_parallel_figures(device, size["tiny"]),
    ):
        try:
            section()
        except Exception as error:  # an out-of-memory or a missing compiler must not lose the other figures
            report("timing", "FAIL", f"{type(error).__name__}: {str(error)[:300]}")
    counts = {status: sum(1 for _, s, _ in RESULTS if s == status) for status in ("ok", "FAIL", "skip")}
    print(f"\n{counts['ok']} passed, {counts['FAIL']} failed, {counts['skip']} skipped")
    print(f"gpu_check: {time.perf_counter() - started:.0f} s on {device}")
    failed = counts["FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
