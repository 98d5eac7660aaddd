"""What splitting the visual tokens over processes (--sequence_parallel) buys: each process's peak memory
and the step time of a DiT step (generation: the CFG batch of 2, no gradients) and of a LoRA training step
(gradient checkpointing, as the spec's commands), with the tokens split over 1, 2 and 4 processes.

The DiT is the real architecture's width (Pro by default) with one text block and one visual block,
random bf16 weights; each case runs as its own torchrun group (gloo on the CPU, NCCL on GPUs, one per
process). The peak is per process, above what it held before the step (benchmarks/stage_memory.py's
DevicePeak: torch.cuda.max_memory_allocated on a GPU; on the CPU the process's peak anonymous memory),
the largest over the processes. A step runs its blocks one after another, so one visual block's
activations are a generation step's; in training each further block adds its stored input (1/N of it
per process).

A Pro 10 s HD step (249,856 tokens) is far too slow on a CPU, so there the cases run at two token counts
(1 and 4 latent frames of 64x96: 1,536 and 6,144 tokens) and the figure at the full length follows from
the measured slope; on a GPU (benchmarks/gpu_check.py) they run at the full length, and the step time is
measured over the GPUs it finds.

    python benchmarks/sequence_parallel.py                          # Pro, 1/2/4 CPU processes (~10 min)
    python benchmarks/sequence_parallel.py --device cuda --latent 61 128 128 --processes 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stage_memory import GIB, DevicePeak, dit_inputs, reduced_dit  # noqa: E402

from modules.ports import free_port  # noqa: E402

PRO_10S_HD = 61 * 64 * 64  # tokens of k5-pro-t2v-10s-hd: 61 latent frames of 128 x 128 (1024 x 1024 px)


def step(dit, params, args, device) -> None:
    """One generation step (CFG batch of 2) or one LoRA training step, as stage_memory's DiT cases."""
    torch.manual_seed(0)  # the same inputs in every process
    if args.mode == "train":
        x, text, pooled, t = dit_inputs(params, args.latent, 1, device)
        dit(x, text, pooled, t, rope_scale=(1.0, 2.0, 2.0)).float().square().mean().backward()
        args.optimizer.step()
        args.optimizer.zero_grad(set_to_none=True)
    else:
        x, text, pooled, t = dit_inputs(params, args.latent, 2, device)
        with torch.no_grad():
            dit(x, text, pooled, t, rope_scale=(1.0, 2.0, 2.0))


def child(args) -> None:
    import torch.distributed as dist

    from kandinsky5.inference.processes import leave_processes
    from kandinsky5.model.sequence_parallel import SequenceSplit

    cuda = args.device.startswith("cuda")
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    else:  # freed tensors leave the process's memory (see stage_memory.child)
        from modules.memory import LOADING_MMAP_THRESHOLD, set_mmap_threshold

        set_mmap_threshold(LOADING_MMAP_THRESHOLD)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    dit, params = reduced_dit(args.model, args.visual_blocks, device)
    if size > 1:
        dit.enable_sequence_parallel(SequenceSplit(rank, size))
    if args.mode == "train":
        from networks.lora_kandinsky import create_network

        dit.requires_grad_(False)
        dit.gradient_checkpointing = True
        network = create_network(dit, 16, 16.0)
        network.apply_to(dit)
        network.to(device).train()
        args.optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-4)
    # a first step, not measured, for the exchanges' and kernels' start-up (small on the CPU: it is slow)
    measured, args.latent = args.latent, args.latent if cuda else [1, 16, 16]
    step(dit, params, args, device)
    args.latent = measured
    dist.barrier()
    peak = DevicePeak(device)
    began = time.perf_counter()
    step(dit, params, args, device)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    every = [None] * size
    dist.all_gather_object(every, (peak.stop(), seconds))
    if rank == 0:
        tokens = args.latent[0] * (args.latent[1] // 2) * (args.latent[2] // 2)
        peaks = [p for p, _ in every]
        print(json.dumps({"tokens": tokens, "peak": max(peaks), "peaks": peaks, "seconds": max(s for _, s in every)}))
    leave_processes()
    # About 1 run in 15 a process aborted in the interpreter's teardown after this point ("terminate
    # called without an active exception", cause not found): the child's work is done and printed, so
    # it ends here without the teardown.
    sys.stdout.flush()
    os._exit(0)


def run_case(args, mode: str, processes: int, latent: list[int]) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(port), __file__, "--child", "--mode", mode, "--model", args.model, "--device", args.device,
               "--visual_blocks", str(args.visual_blocks), "--latent", *map(str, latent)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"benchmark case failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pro", help="lite, pro, image or a task name (default pro)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: one GPU per process")
    parser.add_argument("--processes", type=int, nargs="*", default=[1, 2, 4], help="split sizes to run")
    parser.add_argument("--modes", nargs="*", choices=["generate", "train"], default=["generate", "train"])
    parser.add_argument(
        "--latent",
        type=int,
        nargs=3,
        action="append",
        metavar=("FRAMES", "HEIGHT", "WIDTH"),
        help="latent sizes to run (repeatable; default: 1 64 96 and 4 64 96)",
    )
    parser.add_argument("--visual_blocks", type=int, default=1, help="visual blocks of the reduced DiT")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["generate", "train"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.latent = args.latent[0]
        child(args)
        return
    latents = args.latent or [[1, 64, 96], [4, 64, 96]]
    blocks = f"1 text + {args.visual_blocks} visual block"
    print(f"{args.model} DiT ({blocks}), bf16, {args.device}, torch {torch.__version__}")
    print("| step | tokens | processes | peak per process (GiB) | vs 1 process | seconds |")
    print("|---|---|---|---|---|---|")
    rows = []
    for mode in args.modes:
        for latent in latents:
            alone = None
            for processes in args.processes:
                result = {"mode": mode, "processes": processes, **run_case(args, mode, processes, latent)}
                rows.append(result)
                alone = result["peak"] if processes == 1 else alone
                ratio = f"{result['peak'] / alone:.2f}" if alone else "-"
                what = "LoRA step (checkpointing)" if mode == "train" else "DiT step (CFG batch 2)"
                print(
                    f"| {what} | {result['tokens']:,} | {processes} | {result['peak'] / GIB:.3f} | {ratio} | "
                    f"{result['seconds']:.2f} |",
                    flush=True,
                )
    if len(latents) > 1:
        print(f"\nat the Pro 10 s HD length ({PRO_10S_HD:,} tokens), from the slope between the two lengths:")
        for mode in args.modes:
            for processes in args.processes:
                same = [r for r in rows if r["mode"] == mode and r["processes"] == processes]
                low, high = same[0], same[-1]
                slope = (high["peak"] - low["peak"]) / (high["tokens"] - low["tokens"])
                full = high["peak"] + slope * (PRO_10S_HD - high["tokens"])
                per_token = f"{slope / 1024:.0f} KB per token"
                print(f"- {mode}, {processes} process(es): {per_token}, {full / GIB:.1f} GiB per process")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
