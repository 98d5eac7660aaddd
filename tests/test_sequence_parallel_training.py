"""--sequence_parallel in training (#40): a LoRA trained with each step's tokens split over 2 CPU processes
(gloo) equals the LoRA one process trains, alone and sharded with FSDP; its states resume exactly; 4
processes train as 2 groups of 2 what 2 data-parallel processes train, with the weights sharded over
all 4 too; bf16 runs; splits that do not fit are refused before loading."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

import kandinsky5_train_network
from dataset.training_data import TrainingSample
from kandinsky5.model.tasks import get_task
from kandinsky5.training.sequence_groups import check_sequence_split

from .generation_helpers import accelerate_launch
from .test_fsdp import DDP_CONFIG, FSDP_CONFIG, largest_difference, launch
from .training_helpers import ROOT, sampling_args, train_args

SP_CONFIG = ROOT / "examples" / "accelerate" / "sequence_parallel.yaml"

# fp32: the split changes only the order of some sums; the LoRA after 3 AdamW steps (measured below)
LORA_TOLERANCE = 1e-5


def test_a_split_run_trains_the_one_process_lora_with_and_without_fsdp_and_resumes(tiny_tree, cached_dataset, tmp_path):
    _, config, _ = cached_dataset
    steps = ["--max_train_steps", "3", "--network_dim", "4"]
    launch(accelerate_launch(1, *train_args(tiny_tree, config, tmp_path / "one", *steps)))
    split = ["--sequence_parallel", "2"]
    saving = ["--save_every_n_steps", "2", "--save_state"]
    ddp = launch(
        accelerate_launch(
            2, *train_args(tiny_tree, config, tmp_path / "sp", *steps, *split, *saving), config_file=SP_CONFIG
        )
    )
    assert ddp.stdout.count("runs 1/2 of each step's visual tokens in group 1 of 1") == 2
    fsdp = launch(
        accelerate_launch(2, *train_args(tiny_tree, config, tmp_path / "fsdp", *steps, *split), config_file=FSDP_CONFIG)
    )
    assert "FSDP: process 1 holds" in fsdp.stdout
    for name in ("sp", "fsdp"):
        difference = largest_difference(tmp_path / "one/lora.safetensors", tmp_path / name / "lora.safetensors")
        print(f"{name}: largest difference to the one-process LoRA {difference:.3g}")
        assert difference <= LORA_TOLERANCE
    sums = re.findall(r"LoRA checksum (\S+?e[+-]\d\d)", ddp.stdout)
    assert len(sums) == 2 and sums[0] == sums[1]

    state = tmp_path / "sp" / "lora-step00000002-state"
    launch(accelerate_launch(2, *train_args(tiny_tree, config, tmp_path / "resumed", *steps, *split, "--resume",
                                            str(state))))  # fmt: skip
    first, second = (load_file(str(tmp_path / name / "lora.safetensors")) for name in ("sp", "resumed"))
    assert all(bool((first[k] == second[k]).all()) for k in first)  # continues exactly


def test_two_groups_of_two_train_what_two_data_parallel_processes_train_with_and_without_fsdp(
    tiny_tree, cached_dataset, tmp_path
):
    _, config, _ = cached_dataset
    steps = ["--max_train_steps", "2", "--network_dim", "4"]
    launch(accelerate_launch(2, *train_args(tiny_tree, config, tmp_path / "ddp", *steps), config_file=DDP_CONFIG))
    split = ["--sequence_parallel", "2"]
    arguments = train_args(tiny_tree, config, tmp_path / "sp", *steps, *split)
    four = launch(accelerate_launch(4, *arguments, config_file=SP_CONFIG))
    for group in (1, 2):
        assert four.stdout.count(f"runs 1/2 of each step's visual tokens in group {group} of 2") == 2
    # and the weights sharded over all 4 with FSDP, each clip split over a group of 2
    sharded = launch(
        accelerate_launch(4, *train_args(tiny_tree, config, tmp_path / "fsdp", *steps, *split), config_file=FSDP_CONFIG)
    )
    assert sharded.stdout.count("FSDP: process") == 4 and "in group 2 of 2" in sharded.stdout
    for name in ("sp", "fsdp"):
        difference = largest_difference(tmp_path / "ddp/lora.safetensors", tmp_path / name / "lora.safetensors")
        print(f"2 groups of 2 ({name}) against 2 data-parallel processes: largest difference {difference:.3g}")
        assert difference <= LORA_TOLERANCE


def test_lokr_with_dora_in_bf16_with_checkpointing_validates_and_samples_as_one_process(
    tiny_tree, cached_dataset, tmp_path
):
    _, config, video_only = cached_dataset
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --f 5 --s 2\n")
    options = ["--max_train_steps", "2", "--mixed_precision", "bf16", "--gradient_checkpointing",
               "--network_module", "networks.lokr_kandinsky", "--network_args", "dora_wd=True",
               "--validation_dataset_config", str(video_only), "--validate_every_n_steps", "1",
               "--sample_every_n_steps", "2", *sampling_args(tiny_tree, prompts)]  # fmt: skip
    one = launch(accelerate_launch(1, *train_args(tiny_tree, config, tmp_path / "one", *options)))
    split = ["--sequence_parallel", "2"]
    two = launch(accelerate_launch(2, *train_args(tiny_tree, config, tmp_path / "sp", *options, *split)))
    losses = [[float(v) for v in re.findall(r"step \d: validation loss (\S+)", run.stdout)] for run in (one, two)]
    print(f"bf16 validation losses, one process {losses[0]}, split over 2 {losses[1]}")
    assert len(losses[1]) == 2 and all(abs(a - b) <= 1e-2 * abs(a) for a, b in zip(*losses, strict=True))
    difference = largest_difference(tmp_path / "one/lora.safetensors", tmp_path / "sp/lora.safetensors")
    print(f"bf16 LoKr+DoRA: largest difference to the one-process file {difference:.3g}")
    assert difference <= 1e-3
    samples = list((tmp_path / "sp" / "sample").rglob("*.mp4"))
    assert [p.relative_to(tmp_path / "sp" / "sample").as_posix() for p in samples] == ["step00000002/000_42.mp4"]


@pytest.mark.parametrize(
    ("processes", "size", "message"),
    [
        ("1", "2", "--sequence_parallel 2 needs a multiple of 2 processes; this run has 1. Launch it with accelerate "
                   "launch --num_processes 2 kandinsky5_train_network.py"),
        ("3", "2", "--sequence_parallel 2 needs a multiple of 2 processes; this run has 3"),
        ("3", "3", "--sequence_parallel 3: the DiT has 4 attention heads, which do not split over 3 processes"),
    ],
)  # fmt: skip
def test_splits_that_do_not_fit_stop_before_loading(
    tiny_tree, cached_dataset, tmp_path, monkeypatch, processes, size, message
):
    monkeypatch.setenv("WORLD_SIZE", processes)
    _, config, _ = cached_dataset
    args = train_args(tiny_tree, config, tmp_path, "--max_train_steps", "1", "--sequence_parallel", size)
    with pytest.raises(SystemExit, match=re.escape(message)):
        kandinsky5_train_network.main(args)
    assert not list(tmp_path.iterdir())


def test_a_bucket_whose_tokens_do_not_split_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    sample = TrainingSample(Path("cache/a_0048x0048_k5tk.safetensors"), Path("t"), (1, 6, 6, 16))  # 3 x 3 tokens
    even = TrainingSample(Path("cache/b_0064x0064_k5tk.safetensors"), Path("t"), (3, 8, 8, 16))
    datasets = [SimpleNamespace(samples=[even, even]), SimpleNamespace(samples=[sample])]
    why = check_sequence_split(2, get_task("tiny-t2v").dit_params, datasets)
    assert why.startswith("--sequence_parallel 2: the bucket of cache/a_0048x0048_k5tk.safetensors (48x48 px, 1 latent")
    assert "has 9 visual tokens, which do not split over 2 processes" in why
    assert check_sequence_split(2, get_task("tiny-t2v").dit_params, datasets[:1]) is None
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert check_sequence_split(4, get_task("k5-pro-t2v-5s-sd").dit_params, datasets[:1]) is None
    assert "the DiT has 28 attention heads" in check_sequence_split(8, get_task("k5-lite-t2v-5s-sd").dit_params, [])
