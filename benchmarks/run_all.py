"""Every benchmark side by side with diffusers, in one run, as one table.

Cases (benchmarks/suite_cases.py): DiT forward, DiT forward+backward (frozen weights), one sampling
step with CFG, one LoRA training step, HunyuanVideo VAE encode. Each (case, side) runs in a child
process of its own, so its peak anonymous memory (RssAnon sampled every 5 ms from when the model is
built, with the building's leftovers returned to the system, until it has run once; on CUDA the
peak allocated GPU memory) is its own. Times are the best of
--runs after that first run, with the sampler stopped.

For the DiT rows the table also gives the matmul work counted from the shapes (benchmarks/
roofline.py), the time the same matmuls take as plain matmuls on this device (the roofline, the
best of both children shown), and the fraction of its own roofline each side reaches. Each child
measures that fraction in --runs more runs with the roofline's share of each block run right after
the block (benchmarks/interleaved.py), so that a machine whose speed drifts slows both alike: the
sum of the roofline's times over the sum of the model's.

    python benchmarks/run_all.py [--device cpu|cuda] [--runs 5] [--compile] [--only "DiT forward"]
                                 [--sides ours]

--sides ours times our side alone (diffusers' columns stay empty): a quick check of a change, not
a comparison.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_forward import child_command, child_result  # noqa: E402
from interleaved import Interleaved  # noqa: E402
from memory import PeakSampler  # noqa: E402
from roofline import backward_parts, backward_shapes, forward_parts, forward_shapes, total_flops  # noqa: E402
from suite_cases import CASES, PROMPTS  # noqa: E402

from kandinsky5.model.tasks import get_task  # noqa: E402
from modules.memory import release_freed_memory  # noqa: E402

GIB = 2**30
SIZES = ("qwen_layers", "task", "frames", "side", "text_tokens", "vae_frames", "vae_side", "device", "runs", "compile")
PROMPT_CASE = "prompt encoding (Qwen)"


def child(args: argparse.Namespace) -> None:
    cuda = args.device.startswith("cuda")
    run = CASES[args.case](args.side_name, args)
    release_freed_memory()  # what building the random model left behind is no part of either side's cost
    sampler = PeakSampler()  # the model in memory and its first run (compilation included)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    run()  # warm-up (and compilation), with the memory sampler on
    sync()
    peak = torch.cuda.max_memory_allocated() if cuda else sampler.stop()  # the sampler thread would slow the timing
    times = [timed(run, sync) for _ in range(args.runs)]
    result = {"best": min(times), "times": times, "peak_bytes": peak}
    if args.case in DIT_CASES:  # then as many runs again, each block followed by its share of the roofline
        forward, backward, flops = dit_work(args)[args.case]
        interleaved = Interleaved(run.model, forward, backward, args.device, sync)
        model_seconds, roof_seconds = zip(*(interleaved.measure(run) for _ in range(args.runs)), strict=True)
        result.update(interleaved=model_seconds, roof_times=roof_seconds, roof_best=min(roof_seconds), flops=flops)
    print(json.dumps(result))


def timed(function, sync) -> float:
    start = time.perf_counter()
    function()
    sync()
    return time.perf_counter() - start


def write_random_vae(folder: Path) -> None:
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    AutoencoderKLHunyuanVideo().save_pretrained(folder)


def write_random_qwen(folder: Path, layers: int) -> None:
    from suite_cases import QWEN_WIDTH

    from kandinsky5.tiny import write_qwen

    write_qwen(folder, seed=0, language={**QWEN_WIDTH, "num_hidden_layers": layers}, dtype=torch.bfloat16)


DIT_CASES = ("DiT forward", "DiT forward+backward", "sampling step (CFG)")


def dit_work(args: argparse.Namespace) -> dict[str, tuple]:
    """Per DiT case: the roofline's parts of a forward and of a backward for a batch size
    (benchmarks/roofline.py), and the matmul FLOPs of one unit of work."""
    params = dict(get_task(args.task).dit_params)
    visual = args.frames * (args.side // 2) ** 2

    def forward(batch: int) -> dict:
        return forward_parts(params, visual, args.text_tokens, batch)

    def backward(batch: int) -> dict:
        return backward_parts(params, visual, args.text_tokens, batch)

    one = total_flops(forward_shapes(params, visual, args.text_tokens))
    return {
        "DiT forward": (forward, backward, one),
        "DiT forward+backward": (
            forward,
            backward,
            one + total_flops(backward_shapes(params, visual, args.text_tokens)),
        ),
        "sampling step (CFG)": (forward, backward, total_flops(forward_shapes(params, visual, args.text_tokens, 2))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="k5-lite-t2v-5s-sd", help="preset whose DiT dimensions to use")
    parser.add_argument("--frames", type=int, default=2, help="latent frames of the DiT cases")
    parser.add_argument("--side", type=int, default=16, help="latent height and width of the DiT cases")
    parser.add_argument("--text_tokens", type=int, default=32)
    parser.add_argument("--vae_frames", type=int, default=9, help="pixel frames of the VAE case (4k+1)")
    parser.add_argument("--vae_side", type=int, default=128, help="pixel height and width of the VAE case")
    parser.add_argument("--qwen_layers", type=int, default=2, help="language-model layers of the Qwen case (28 in 7B)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up; the best is reported")
    parser.add_argument("--compile", action="store_true", help="our DiT blocks torch.compile'd (as --compile)")
    parser.add_argument("--only", action="append", choices=list(CASES), help="run only these cases")
    parser.add_argument(
        "--sides",
        choices=("both", "ours", "peer"),
        default="both",
        help="which implementations to run (default both; 'ours' alone takes minutes instead of diffusers' hour)",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--side_name", help=argparse.SUPPRESS)
    parser.add_argument("--vae_folder", help=argparse.SUPPRESS)
    parser.add_argument("--qwen_folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        child(args)
        return

    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device {args.device}")
    import diffusers
    import peft

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}")
    print(
        f"{args.task} dims, bf16; DiT cases: {args.frames} latent frames of {args.side}x{args.side} "
        f"+ {args.text_tokens} text tokens; VAE: {args.vae_frames} frames of {args.vae_side}x{args.vae_side}; "
        f"Qwen: 7B width, {args.qwen_layers} layers, {len(PROMPTS)} prompts"
    )
    cases = args.only or list(CASES)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "VAE encode" in cases:
            write_random_vae(Path(tmp) / "vae")
        if PROMPT_CASE in cases:
            write_random_qwen(Path(tmp) / "qwen", args.qwen_layers)
        for case in cases:
            result = {}
            for side in ("ours", "peer") if args.sides == "both" else (args.sides,):
                options = {name: getattr(args, name) for name in SIZES}
                folders = {"vae_folder": Path(tmp) / "vae", "qwen_folder": Path(tmp) / "qwen"}
                command = child_command(__file__, case=case, side_name=side, **folders, **options)
                result[side] = child_result(command)
            rows.append((case, result))
            print_row(case, result)
    print_table(rows)


def seconds(result: dict, side: str) -> str:
    return f"{result[side]['best']:.3f}" if side in result else "-"


def gib(result: dict, side: str) -> str:
    return f"{result[side]['peak_bytes'] / GIB:.2f}" if side in result else "-"


def fraction(measured: dict) -> float:
    """The roofline's seconds over the model's, summed over the runs interleaved block by block."""
    return sum(measured["roof_times"]) / sum(measured["interleaved"])


def print_row(case: str, result: dict) -> None:
    print(f"  {case}: ours {seconds(result, 'ours')} s, diffusers {seconds(result, 'peer')} s", flush=True)


def print_table(rows) -> None:
    print()
    print(
        "| case | ours (s) | diffusers (s) | ours/diffusers | ours peak (GiB) | diffusers peak (GiB) "
        "| GFLOP | roofline (s) | ours / diffusers of roofline |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case, result in rows:
        both = "ours" in result and "peer" in result
        ratio = f"{result['ours']['best'] / result['peer']['best']:.3f}" if both else "-"
        line = (
            f"| {case} | {seconds(result, 'ours')} | {seconds(result, 'peer')} | {ratio} "
            f"| {gib(result, 'ours')} | {gib(result, 'peer')} |"
        )
        measured = [side for side in ("ours", "peer") if "roof_best" in result.get(side, {})]
        if measured:  # each side against the roofline measured beside it
            roof = min(result[side]["roof_best"] for side in measured)
            fractions = [f"{fraction(result[side]):.0%}" if side in measured else "-" for side in ("ours", "peer")]
            flops = result[measured[0]]["flops"]
            line += f" {flops / 1e9:.0f} | {roof:.3f} | {fractions[0]} / {fractions[1]} |"
        else:
            line += " | | |"
        print(line)


if __name__ == "__main__":
    main()
