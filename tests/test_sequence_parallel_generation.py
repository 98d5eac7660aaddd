"""--sequence_parallel in generation (#40): the command launched with 2 CPU processes (gloo) writes what
one process writes, for a Lite-shaped task with NABLA and MagCache, a Pro-shaped task with a prompt file,
I2V with a first and last frame (with fp8 weights and block swap), and image editing; only the first
process writes. Splits the scheme cannot make are
refused before any model loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from kandinsky5.inference.processes import sequence_parallel_size
from kandinsky5.model.sequence_parallel import SequenceSplitError
from kandinsky5.model.tasks import get_task

from .generation_helpers import accelerate_launch, generate, model_args
from .test_first_last import pictures
from .training_helpers import ROOT

TOLERANCE = 1e-5  # fp32; the split only changes the order of some sums (measured: 0)


def split_run(tree, task: str, *extra: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = accelerate_launch(processes, *model_args(tree, task), *extra, script="kandinsky5_generate_video.py")
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


CASES = {
    "lite-nabla-magcache": ("tiny-t2v-nabla", ["--prompt", "a dog", "--frames", "9", "--width", "128", "--height",
                                              "128", "--steps", "4", "--magcache", "--guidance", "5"]),
    "pro-prompt-file": ("tiny-pro-t2v", ["--steps", "3"]),
    "i2v-first-last": ("tiny-i2v", ["--prompt", "waves", "--frames", "9", "--steps", "3", "--separate_cfg_passes",
                                    "--fp8_base", "--blocks_to_swap", "2"]),
    "i2i": ("tiny-i2i", ["--prompt", "make it winter", "--steps", "3"]),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_two_processes_write_what_one_process_writes(tiny_tree, tmp_path, case):
    task, extra = CASES[case]
    extra = [*extra, "--no_expand_prompt", "--save_latent"]
    outputs = {}
    if case == "pro-prompt-file":  # two jobs, one with guidance and one without
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red car --w 64 --h 64 --f 9 --d 3 --g 4\na blue boat --w 64 --h 96 --f 5 --d 4 --g 1\n")
        extra += ["--from_file", str(prompts)]
        for name in ("one", "two"):
            outputs[name] = [tmp_path / name / "000_3.mp4", tmp_path / name / "001_4.mp4"]
    else:
        for name in ("one", "two"):
            outputs[name] = [tmp_path / name / ("out.png" if case == "i2i" else "out.mp4")]
    if case == "i2v-first-last":
        first, last = pictures(tmp_path)
        extra += ["--image", str(first), "--image_last", str(last)]
    if case == "i2i":
        extra += ["--image", str(pictures(tmp_path)[0])]

    def output_option(name):
        return ["--output", str(tmp_path / name if case == "pro-prompt-file" else outputs[name][0])]

    generate(tiny_tree, task, *extra, *output_option("one"))
    run = split_run(tiny_tree, task, *extra, *output_option("two"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "split over 2 processes" in run.stdout
    for one, two in zip(outputs["one"], outputs["two"], strict=True):
        assert two.exists() and run.stdout.count(f"wrote {two}\n") == 1  # the first process alone writes
        a = load_file(f"{one}.latent.safetensors")["latent"]
        b = load_file(f"{two}.latent.safetensors")["latent"]
        difference = float((a - b).abs().max())
        print(f"{case} {two.name}: largest latent difference {difference:.3g}")
        assert difference <= TOLERANCE
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        n for p in outputs["two"] for n in (p.name, f"{p.name}.latent.safetensors")
    )
    if case == "lite-nabla-magcache":
        assert run.stdout.count("MagCache skipped") == 1 and "MagCache skipped the visual blocks on 0" not in run.stdout


def test_splits_that_do_not_fit_are_refused_before_models_load(tiny_tree, tmp_path, monkeypatch):
    common = [*model_args(tiny_tree, "tiny-t2v"), "--prompt", "a dog", "--output", str(tmp_path / "x.mp4")]
    # one process asked to split over 2
    one = subprocess.run([sys.executable, "kandinsky5_generate_video.py", *common, "--sequence_parallel", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode != 0
    assert "--sequence_parallel 2 needs 2 processes; this run has 1" in one.stderr
    assert "accelerate launch --num_processes 2" in one.stderr and "Traceback" not in one.stderr
    # 3 processes: the tiny DiT's 4 heads do not split over 3
    three = split_run(tiny_tree, "tiny-t2v", "--prompt", "a dog", "--output", str(tmp_path / "y.mp4"), processes=3)
    assert three.returncode != 0
    assert "error: --sequence_parallel 3: the DiT has 4 attention heads" in three.stderr  # (and the launcher's report)
    assert not list(tmp_path.glob("*.mp4"))
    # tokens: 9 frames (3 latent frames) of 48 x 48 (3 x 3 tokens) = 27, odd
    monkeypatch.setenv("WORLD_SIZE", "2")
    jobs = [type("Job", (), {"index": 0, "width": 48, "height": 48, "frames": 9})()]
    with pytest.raises(SequenceSplitError, match="job 1 \\(48x48, 9 frames\\) has 27 visual tokens"):
        sequence_parallel_size(2, get_task("tiny-t2v"), jobs)
    for task, heads in (("k5-lite-t2v-5s-sd", 28), ("k5-pro-t2v-5s-sd", 32), ("k5-lite-t2i-hd", 20)):
        jobs[0].width, jobs[0].height, jobs[0].frames = 768, 512, 121
        assert sequence_parallel_size(2, get_task(task), jobs) == 2
        monkeypatch.setenv("WORLD_SIZE", "8")
        if heads % 8:
            with pytest.raises(SequenceSplitError, match=f"the DiT has {heads} attention heads"):
                sequence_parallel_size(8, get_task(task), jobs)
        else:
            assert sequence_parallel_size(None, get_task(task), jobs) == 8  # default: every process launched
        monkeypatch.setenv("WORLD_SIZE", "2")
    assert os.environ["WORLD_SIZE"] == "2" and torch.distributed.is_available()
