"""benchmarks/run_all.py end to end on a tiny DiT: both sides, the table, the roofline columns."""

import subprocess
import sys
from pathlib import Path

RUN_ALL = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"


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
