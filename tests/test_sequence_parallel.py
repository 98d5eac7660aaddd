"""Sequence parallelism (#40, the DiT's part): the visual tokens split over 2 and 3 CPU processes (gloo)
give the one-process output and LoRA gradients, for a Lite- and a Pro-shaped tiny DiT, with NABLA on and
off."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from modules.ports import free_port

from .training_helpers import ROOT

TOLERANCE = 1e-5  # fp32: the split changes only the order of some sums (measured differences printed)
# Relative, in norm, per LoRA tensor. The random tiny DiT's fp32 LoRA gradients of the text blocks are
# small sums of large terms that cancel: the same gradient taken per sample and averaged differs from the
# batch's by up to 8.7e-5 (Pro-shaped, 6 heads). The split measured 3e-6 to 6e-5; a wrong factor or
# path would be of order 1.
GRADIENT_TOLERANCE = 2e-4


def run_workers(processes: int, task: str, nabla: str, *mode: str) -> str:
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(port), "tests/sequence_parallel_worker.py", task, nabla, *mode]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("task", ["tiny-t2v", "tiny-pro-t2v"])
@pytest.mark.parametrize("nabla", ["off", "on"])
def test_two_processes_give_the_one_process_output(task, nabla):
    out = run_workers(2, task, nabla)
    differences = [float(d) for d in re.findall(r"largest difference ([0-9.e+-]+)", out)]
    print(out)
    assert len(differences) == 2 and max(differences) <= TOLERANCE
    tokens = 3 * 8 * 8 if nabla == "on" else 4 * 3 * 3
    assert out.count(f": {tokens // 2} tokens,") == 2  # each process ran the blocks on half of them


CASES = [("tiny-t2v", "off", 2), ("tiny-pro-t2v", "on", 2), ("tiny-t2v", "on", 3), ("tiny-pro-t2v", "off", 3)]


@pytest.mark.parametrize(("task", "nabla", "processes"), CASES)
def test_lora_gradients_averaged_over_the_processes_are_the_one_process_gradients(task, nabla, processes):
    heads = "6" if processes == 3 else "4"
    out = run_workers(processes, task, nabla, "grad", heads)
    differences = [float(d) for d in re.findall(r"largest difference ([0-9.e+-]+)", out)]
    print(out)
    assert len(differences) == processes and max(differences) <= GRADIENT_TOLERANCE


def test_three_processes_give_the_one_process_output_when_the_heads_split():
    out = run_workers(3, "tiny-t2v", "on", "forward", "6")
    differences = [float(d) for d in re.findall(r"largest difference ([0-9.e+-]+)", out)]
    print(out)
    assert len(differences) == 3 and max(differences) <= TOLERANCE and out.count(": 64 tokens,") == 3


def test_heads_that_do_not_split_are_refused_with_the_reason():
    out = run_workers(3, "tiny-t2v", "off")
    assert out.count("refused: --sequence_parallel 3: the DiT has 4 attention heads") == 3
