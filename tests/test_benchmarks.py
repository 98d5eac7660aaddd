"""benchmarks/run_all.py end to end on a tiny DiT: both sides, the table, the roofline columns."""

import subprocess
import sys
from pathlib import Path

import torch

RUN_ALL = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"
ROOT = Path(__file__).resolve().parents[1]


def run_all(*options: str) -> list[str]:
    command = [sys.executable, str(RUN_ALL), "--task", "tiny-t2v", "--runs", "1", "--frames", "1", "--side", "4"]
    done = subprocess.run([*command, *options], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if line.startswith("| DiT forward")]


def cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_run_all_compares_both_sides_and_counts_the_roofline():
    (row,) = run_all("--only", "DiT forward")
    case, ours, peer, ratio, ours_peak, peer_peak, gflop, roofline, fractions = cells(row)
    assert case == "DiT forward"
    assert float(ours) > 0 and float(peer) > 0 and float(ratio) > 0
    assert float(ours_peak) > 0 and float(peer_peak) > 0 and float(roofline) > 0
    assert float(gflop) >= 0 and all(part.strip().endswith("%") for part in fractions.split("/"))


def test_run_all_times_our_side_alone():
    (row,) = run_all("--only", "DiT forward", "--sides", "ours")
    _, ours, peer, ratio, ours_peak, peer_peak, _, _, fractions = cells(row)
    assert float(ours) > 0 and float(ours_peak) > 0
    assert peer == ratio == peer_peak == "-" and fractions.endswith("/ -")


def test_the_counted_matmul_work_is_what_the_model_runs():
    """forward_shapes / backward_shapes against the FLOPs PyTorch counts in a real pass of a tiny DiT
    (visual conditioning, masked-free text)."""
    sys.path.insert(0, str(RUN_ALL.parent))
    from dit_forward import build, inputs
    from roofline import backward_shapes, forward_shapes, total_flops
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from kandinsky5.model.tasks import get_task

    task, frames, side, text_tokens = "tiny-t2v", 2, 8, 5
    params, visual = get_task(task).dit_params, frames * (side // 2) ** 2
    model = build("ours", task, "cpu")
    x, text, pooled, time_ = inputs(task, "cpu", frames, side, text_tokens)
    # the math kernel: its products are matmuls the counter sees (it has no count for the CPU's fused kernel)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), FlopCounterMode(display=False) as counted:
        model(x, text, pooled, time_)
    assert counted.get_total_flops() == total_flops(forward_shapes(params, visual, text_tokens))

    with sdpa_kernel(SDPBackend.MATH):
        out = model(x.requires_grad_(True), text, pooled, time_)
    with FlopCounterMode(display=False) as counted:
        out.float().square().mean().backward()
    # the math kernel's backward keeps the attention weights: nothing is recomputed
    assert counted.get_total_flops() == total_flops(backward_shapes(params, visual, text_tokens))


def test_the_interleaved_roofline_runs_each_blocks_share_after_that_block_once():
    sys.path.insert(0, str(RUN_ALL.parent))
    from dit_forward import build, inputs
    from interleaved import Interleaved
    from roofline import backward_parts, forward_parts

    from kandinsky5.model.tasks import get_task

    task, frames, side, text_tokens = "tiny-t2v", 1, 4, 3
    params, visual = get_task(task).dit_params, frames * (side // 2) ** 2
    model = build("ours", task, "cpu")
    x, text, pooled, time_ = inputs(task, "cpu", frames, side, text_tokens)
    x.requires_grad_(True)  # a leaf used by every run, as in the forward+backward case

    def forward_backward():
        model(x, text, pooled, time_).float().square().mean().backward()

    interleaved = Interleaved(
        model,
        lambda batch: forward_parts(params, visual, text_tokens, batch),
        lambda batch: backward_parts(params, visual, text_tokens, batch),
        "cpu",
        lambda: None,
    )
    blocks = {"text block": params["num_text_blocks"], "visual block": params["num_visual_blocks"]}
    expected = {("forward", part, 1): count for part, count in blocks.items()}
    expected |= {("forward", "outside the blocks", 1): 1, ("backward", "outside the blocks", 1): 1}
    expected[("backward", "visual block", 1)] = blocks["visual block"]  # the text needs no gradient
    for _ in range(2):  # the second run meets no hook left over from the first
        model_seconds, roof_seconds = interleaved.measure(forward_backward)
        assert dict(interleaved.shares_run) == expected
        assert model_seconds > 0 and roof_seconds > 0
    pair = [t.expand(2, *t.shape[1:]) for t in (x.detach(), text, pooled)]  # a batch of two (as CFG)
    with torch.no_grad():
        interleaved.measure(lambda: model(*pair, time_))
    once = {**blocks, "outside the blocks": 1}
    assert dict(interleaved.shares_run) == {("forward", part, 2): count for part, count in once.items()}
    assert not model._forward_hooks and not any(block._forward_hooks for block in model.visual_transformer_blocks)


def test_gpu_check_runs_every_check_at_tiny_size_on_the_cpu():
    """benchmarks/gpu_check.py is the one command for a lent GPU; here its checks run tiny on the CPU."""
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--runs", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for check in ("bfloat16 forward", "attention sdpa", "block swap 31", "fp8 Linear", "NABLA attention"):
        assert any(line.startswith("ok") and check in line for line in result.stdout.splitlines()), check
    assert "ok    fp16 training step" in result.stdout and "ok    batch prefetch" in result.stdout
    assert "| sdpa |" in result.stdout and ", 0 failed," in result.stdout
    for row in ("| bf16 | ", "| bf16, 16 swapped | ", "| fp8 | ", "| fp8, 16 swapped | "):  # the memory options, timed
        assert any(line.startswith(row) and "failed" not in line for line in result.stdout.splitlines()), row
    assert "ok    sequence parallel" in result.stdout  # the split benchmark: a row per process count
    for processes in (1, 2):
        assert f"| DiT step (CFG batch 2) | 64 | {processes} | " in result.stdout


def test_docs_memory_md_shows_the_vram_table_the_presets_compute_today():
    """Every cell of docs/memory.md's --vram tables is what benchmarks/vram_table.py prints from the measured
    figures: a change of the figures or of the presets without the docs fails here."""
    table = subprocess.run(
        [sys.executable, "benchmarks/vram_table.py"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert table.returncode == 0, table.stderr
    assert table.stdout.strip() in (ROOT / "docs" / "memory.md").read_text()
