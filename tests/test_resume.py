import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import kandinsky5_train_network

from .generation_helpers import accelerate_launch
from .training_helpers import ROOT, running_until, sampling_args, train_args

STEADY = ["--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--network_dropout", "0.1"]


def lora(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def steps_in(path: Path) -> str:
    with safe_open(str(path), "pt") as f:
        return f.metadata()["ss_steps"]


def test_a_resumed_run_equals_the_uninterrupted_one(tiny_tree, cached_dataset, tmp_path):
    _, config, _ = cached_dataset  # two batches per epoch: a clip, and two images in one batch
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    kandinsky5_train_network.main(train_args(tiny_tree, config, straight, "--max_train_steps", "7", *STEADY))
    kandinsky5_train_network.main(
        train_args(
            tiny_tree, config, stopped, "--max_train_steps", "7", *STEADY, "--save_every_n_steps", "3", "--save_state"
        )
    )
    state = stopped / "lora-step00000003-state"
    position = json.loads((state / "train_state.json").read_text())
    assert (position["step"], position["epoch"], position["next_batch"]) == (3, 2, 1)  # in the middle of epoch 2
    resumed = tmp_path / "resumed"
    kandinsky5_train_network.main(
        train_args(
            tiny_tree,
            config,
            resumed,
            "--max_train_steps",
            "7",
            *STEADY,
            "--save_every_n_steps",
            "3",
            "--resume",
            str(state),
        )
    )
    expected = lora(straight / "lora.safetensors")
    for result in (stopped / "lora.safetensors", resumed / "lora.safetensors"):
        got = lora(result)
        assert all(torch.equal(got[k], expected[k]) for k in expected), result
    assert sorted(p.name for p in resumed.glob("*.safetensors")) == [
        "lora-step00000006.safetensors",
        "lora.safetensors",
    ]
    assert steps_in(resumed / "lora.safetensors") == "7" and steps_in(resumed / "lora-step00000006.safetensors") == "6"


def test_sigint_saves_a_state_that_resumes(tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset
    out = tmp_path / "out"
    command = [
        sys.executable,
        "kandinsky5_train_network.py",
        *train_args(tiny_tree, video_only, out, "--max_train_steps", "100000", "--save_every_n_steps", "1",
                    "--save_state"),
    ]  # fmt: skip
    process = running_until(command, out / "lora-step00000005.safetensors")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    state = Path(re.search(r"continue with --resume (\S+)", stderr)[1])
    assert (state / "train_state.json").exists()
    assert stdout.count(f"saved training state {state}\n") == 1  # the step's own state, not written again
    step = json.loads((state / "train_state.json").read_text())["step"]
    kandinsky5_train_network.main(
        train_args(tiny_tree, video_only, out, "--max_train_steps", str(step + 2), "--resume", str(state))
    )
    assert steps_in(out / "lora.safetensors") == str(step + 2)


def test_a_diverging_run_stops_and_keeps_what_was_saved(tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset
    with pytest.raises(
        SystemExit,
        match=r"the loss is (nan|inf) at step \d+, on the cache files .*clip-[\w-]+_k5tk.safetensors; stopping",
    ):
        kandinsky5_train_network.main(
            train_args(
                tiny_tree,
                video_only,
                tmp_path,
                "--max_train_steps",
                "20",
                "--learning_rate",
                "1e30",
                "--max_grad_norm",
                "0",
                "--save_every_n_steps",
                "1",
            )
        )
    saved = sorted(tmp_path.glob("lora-step*.safetensors"))
    assert saved and all(torch.isfinite(t).all() for t in lora(saved[0]).values())


def test_resume_needs_a_state_folder(tiny_tree, cached_dataset, tmp_path):
    _, config, _ = cached_dataset
    with pytest.raises(SystemExit, match="not a training state folder"):
        kandinsky5_train_network.main(train_args(tiny_tree, config, tmp_path, "--resume", str(tmp_path)))


def test_two_processes_train_the_same_lora_and_write_it_once(tiny_tree, cached_dataset, tmp_path):
    _, config, _ = cached_dataset
    out, prompts = tmp_path / "out", tmp_path / "prompts.txt"
    prompts.write_text("a cat --f 5 --s 2\n")
    sampling = ["--sample_every_n_steps", "2", *sampling_args(tiny_tree, prompts)]
    command = accelerate_launch(
        2,
        *train_args(tiny_tree, config, out, "--max_train_steps", "3", "--save_every_n_steps", "2", *sampling),
    )
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sums = re.findall(r"LoRA checksum (\S+?e[+-]\d\d)", result.stdout)  # the processes' lines may interleave
    assert len(sums) == 2 and sums[0] == sums[1]  # DDP-averaged gradients keep the processes identical
    assert sorted(p.name for p in out.iterdir()) == ["lora-step00000002.safetensors", "lora.safetensors", "sample"]
    assert result.stdout.count("saved ") == 2  # each file written by the main process only
    assert [p.name for p in (out / "sample" / "step00000002").iterdir()] == ["000_42.mp4"]  # sampled once


def test_an_fp16_runs_loss_scale_is_saved_with_the_state_and_restored(tiny_tree, tmp_path):
    """fp16 on a GPU: accelerate's optimizer wrapper carries a GradScaler whose scale has come down from
    65536 by the time a state is saved; the resumed run goes on with that scale, not a new one. (No
    GPU here: the same wrapper around a CPU GradScaler.)"""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    from kandinsky5.training import training_state

    from .test_hostile_input import _position, _tiny_network

    def wrapped():
        network = _tiny_network(tiny_tree)
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=65536.0, growth_interval=7)
        scaler.scale(torch.ones(1))  # the scale exists once the first loss was scaled
        wrapper = AcceleratedOptimizer(optimizer, device_placement=False, scaler=scaler)
        return network, wrapper, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    AcceleratorState._reset_state(reset_partial_state=True)
    Accelerator(cpu=True)  # the state the wrapper reads
    try:
        network, optimizer, scheduler = wrapped()
        optimizer.scaler.update(new_scale=512.0)  # where overflowing steps have brought it
        training_state.save_state(tmp_path / "state", network, {}, optimizer, scheduler, _position())
        assert (tmp_path / "state" / "scaler.pt").is_file()
        network, resumed, scheduler = wrapped()
        assert resumed.scaler.get_scale() == 65536.0
        training_state.load_state(tmp_path / "state", network, resumed, scheduler)
        assert resumed.scaler.get_scale() == 512.0 and resumed.scaler.get_growth_interval() == 7
        plain = torch.optim.AdamW(network.parameters(), lr=1e-3)  # a bf16 run resuming it: nothing to restore
        training_state.load_state(
            tmp_path / "state", network, plain, torch.optim.lr_scheduler.LambdaLR(plain, lambda s: 1)
        )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # the wrapper made one; later tests make their own


def test_three_processes_on_two_batches_and_a_two_process_state_resumed_with_three(tiny_tree, cached_dataset, tmp_path):
    """#36: with fewer batches than processes one process had none and finished alone, and a state saved by
    2 processes resumed by 3 crashed; now every process takes as many steps, and the position maps."""
    _, config, _ = cached_dataset  # a clip and two images in one batch: 2 batches an epoch

    def launch(processes: int, data, out, *extra):
        command = accelerate_launch(processes, *train_args(tiny_tree, data, out, *extra))
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)

    fresh = launch(3, config, tmp_path / "out", "--max_train_steps", "3", "--save_every_n_steps", "1", "--save_state")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "3 processes, 2 batches an epoch: 1 repeated so that each has one" in fresh.stdout
    sums = re.findall(r"process (\d): LoRA checksum (\S+?e[+-]\d\d)", fresh.stdout)
    assert sorted(rank for rank, _ in sums) == ["0", "1", "2"] and len({value for _, value in sums}) == 1

    # the same caches in 7 batches an epoch: a 2-process state saved mid-epoch
    seven = tmp_path / "seven.toml"
    seven.write_text(config.read_text().replace("batch_size = 2", "batch_size = 1\nnum_repeats = 3"))
    two = tmp_path / "two"
    saved = launch(2, seven, two, "--max_train_steps", "1", "--save_every_n_steps", "1", "--save_state")
    assert saved.returncode == 0, saved.stderr[-3000:]
    assert "2 processes, 7 batches an epoch: 1 left out each epoch" in saved.stdout
    state = two / "lora-step00000001-state"
    assert json.loads((state / "train_state.json").read_text())["processes"] == 2
    resumed = launch(3, seven, two, "--max_train_steps", "3", "--resume", str(state))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "the state was saved by 2 process(es), this run has 3: 2 batches of epoch 1 were done, so each process goes "
        "on from batch 0 of its share of epoch 1; the step count goes on from 1" in resumed.stdout
    )
    assert steps_in(two / "lora.safetensors") == "3"
    assert len(re.findall(r"process \d: LoRA checksum", resumed.stdout)) == 3
    alone = launch(1, seven, tmp_path / "alone", "--max_train_steps", "2", "--resume", str(state))
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "the state was saved by 2 process(es), this run has 1: 2 batches of epoch 1 were done" in alone.stdout
    assert steps_in(tmp_path / "alone" / "lora.safetensors") == "2"


@pytest.mark.parametrize("repeats,batches,left_out", [(2, 4, 1), (3, 5, 2)])
def test_three_processes_on_four_and_five_batches_take_the_same_steps(
    tiny_tree, cached_dataset, tmp_path, repeats, batches, left_out
):
    """#36: datasets whose batches do not divide by 3; every process takes as many steps and ends with the
    same LoRA (each of the three really ran: three checksums)."""
    _, config, _ = cached_dataset
    data = tmp_path / "data.toml"
    text = config.read_text().replace("target_frames = [9]", f"target_frames = [9]\nnum_repeats = {repeats}")
    data.write_text(text.replace("batch_size = 2", "batch_size = 1"))
    command = accelerate_launch(3, *train_args(tiny_tree, data, tmp_path / "out", "--max_train_steps", "3"))
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"3 processes, {batches} batches an epoch: {left_out} left out each epoch" in result.stdout
    sums = re.findall(r"process (\d): LoRA checksum (\S+?e[+-]\d\d)", result.stdout)
    assert sorted(rank for rank, _ in sums) == ["0", "1", "2"] and len({value for _, value in sums}) == 1
    assert steps_in(tmp_path / "out" / "lora.safetensors") == "3"
