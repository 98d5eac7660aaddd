"""Training sharded with FSDP2 through the shipped accelerate config, with 2 CPU processes (gloo), and
caching split over 2 processes."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import kandinsky5_train_network
from kandinsky5.training.fsdp_options import FsdpSettings, fsdp_settings

from .generation_helpers import accelerate_launch
from .media_factory import caption, write_image
from .training_helpers import ROOT, sampling_args, train_args

FSDP_CONFIG = ROOT / "examples" / "accelerate" / "fsdp.yaml"
DDP_CONFIG = ROOT / "examples" / "accelerate" / "ddp.yaml"
# FSDP and DDP both average the same two fp32 LoRA gradients; measured: equal to the bit. Stated tolerance:
LORA_TOLERANCE = 1e-6


def launch(command: list[str], exit_code: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == exit_code, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def largest_difference(a, b) -> float:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    return max(float((first[k] - second[k]).abs().max()) for k in first)


def test_fsdp_trains_the_lora_of_ddp_holds_half_the_weights_and_resumes_exactly(tiny_tree, cached_dataset, tmp_path):
    _, config, _ = cached_dataset
    steps = ["--max_train_steps", "3"]
    fsdp = launch(
        accelerate_launch(
            2,
            *train_args(tiny_tree, config, tmp_path / "fsdp", *steps, "--save_every_n_steps", "2", "--save_state"),
            config_file=FSDP_CONFIG,
        )
    )
    launch(accelerate_launch(2, *train_args(tiny_tree, config, tmp_path / "ddp", *steps), config_file=DDP_CONFIG))
    difference = largest_difference(tmp_path / "fsdp/lora.safetensors", tmp_path / "ddp/lora.safetensors")
    print(f"largest difference between the FSDP and the DDP LoRA: {difference:.3g}")
    assert difference <= LORA_TOLERANCE

    held = re.findall(r"FSDP: process (\d) holds ([\d.]+) MiB of the ([\d.]+) MiB of base weights", fsdp.stdout)
    assert sorted(process for process, *_ in held) == ["0", "1"]
    for process, mine, total in held:
        print(f"process {process}: {mine} of {total} MiB of base weights")
        assert 0.45 <= float(mine) / float(total) <= 0.55
    assert fsdp.stdout.count("saved ") == 4  # step 2 and final, LoRA and state, written by one process
    sums = re.findall(r"LoRA checksum (\S+?e[+-]\d\d)", fsdp.stdout)
    assert len(sums) == 2 and sums[0] == sums[1]

    resumed = tmp_path / "resumed"
    state = tmp_path / "fsdp/lora-step00000002-state"
    launch(
        accelerate_launch(
            2, *train_args(tiny_tree, config, resumed, *steps, "--resume", str(state)), config_file=FSDP_CONFIG
        )
    )
    first, second = load_file(str(tmp_path / "fsdp/lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)  # continues exactly


def test_fsdp_in_bf16_with_checkpointing_samples_and_validation(tiny_tree, cached_dataset, tmp_path):
    _, config, video_only = cached_dataset
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --f 5 --s 2\n")
    options = [
        "--max_train_steps",
        "2",
        "--mixed_precision",
        "bf16",
        "--gradient_checkpointing",
        "--validation_dataset_config",
        str(video_only),
        "--validate_every_n_steps",
        "1",
        "--sample_every_n_steps",
        "2",
        *sampling_args(tiny_tree, prompts),
    ]
    fsdp = launch(
        accelerate_launch(2, *train_args(tiny_tree, config, tmp_path / "fsdp", *options), config_file=FSDP_CONFIG)
    )
    ddp = launch(
        accelerate_launch(2, *train_args(tiny_tree, config, tmp_path / "ddp", *options), config_file=DDP_CONFIG)
    )
    difference = largest_difference(tmp_path / "fsdp/lora.safetensors", tmp_path / "ddp/lora.safetensors")
    print(f"bf16: largest difference between the FSDP and the DDP LoRA: {difference:.3g}")
    assert difference <= LORA_TOLERANCE
    losses = [re.findall(r"step \d: validation loss (\S+)", run.stdout) for run in (fsdp, ddp)]
    assert len(losses[0]) == 2 and losses[0] == losses[1]  # printed once per step, the same as without FSDP
    samples = list((tmp_path / "fsdp" / "sample").rglob("*.mp4"))
    assert [p.relative_to(tmp_path / "fsdp" / "sample").as_posix() for p in samples] == ["step00000002/000_42.mp4"]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--blocks_to_swap", "2"], "leave out --blocks_to_swap"),
        (["--fp8_base"], "leave out --fp8_base"),
        (["--mixed_precision", "fp16"], "use --mixed_precision bf16"),
        (["--gradient_checkpointing", "--gradient_checkpointing_cpu_offload"], "use --gradient_checkpointing alone"),
        (["--vram", "24"], "leave out --vram"),
    ],
)
def test_what_does_not_combine_with_fsdp_stops_before_loading(
    tiny_tree, cached_dataset, tmp_path, monkeypatch, option, message
):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    _, config, _ = cached_dataset
    args = train_args(tiny_tree, config, tmp_path, "--max_train_steps", "1", *option)
    args[args.index("--dit") + 1] = str(tmp_path / "not_loaded.safetensors")  # nothing may load before the check
    with pytest.raises(SystemExit, match=re.escape(message)):
        kandinsky5_train_network.main(args)


def test_fsdp_settings_come_from_accelerates_environment():
    assert fsdp_settings({}) is None
    assert fsdp_settings({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == FsdpSettings()
    settings = fsdp_settings(
        {
            "ACCELERATE_USE_FSDP": "true",
            "FSDP_VERSION": "2",
            "FSDP_RESHARD_AFTER_FORWARD": "false",
            "FSDP_OFFLOAD_PARAMS": "true",
            "FSDP_ACTIVATION_CHECKPOINTING": "true",
        }
    )
    assert settings == FsdpSettings(reshard_after_forward=False, offload_params=True, activation_checkpointing=True)
    with pytest.raises(ValueError, match="set fsdp_version: 2"):
        fsdp_settings({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})


def test_two_caching_processes_write_each_item_once(tiny_tree, tmp_path):
    media, cache = tmp_path / "media", tmp_path / "cache"
    media.mkdir()
    for i in range(5):
        caption(write_image(media / f"img{i}.png", 64, 48, seed=i), f"picture {i}")
    (media / "broken.png").write_text("not an image")
    caption(media / "broken.png", "broken")
    config = tmp_path / "data.toml"
    config.write_text(f"""
[[datasets]]
image_directory = "{media}"
cache_directory = "{cache}"
resolution = [64, 48]
""")
    common = ["--dataset_config", str(config), "--task", "tiny-t2v"]
    vae = ["--vae", str(tiny_tree / "vae")]
    latents = launch(accelerate_launch(2, *common, *vae, script="kandinsky5_cache_latents.py"), 1)
    # each process caches its share; one summary counts each item once
    assert re.search(r"cached 5, already up to date 0, failed 1, .*\(by 2 processes\)", latents.stdout), latents.stdout
    assert latents.stdout.count("cached ") == 1 and "broken.png" in latents.stdout
    assert sorted(p.name.split("-")[0] for p in cache.glob("*_k5tk.safetensors")) == [f"img{i}" for i in range(5)]
    encoders = [
        "--text_encoder_qwen",
        str(tiny_tree / "text_encoder"),
        "--text_encoder_clip",
        str(tiny_tree / "text_encoder2"),
    ]
    text = launch(accelerate_launch(2, *common, *encoders, script="kandinsky5_cache_text_encoder_outputs.py"))
    assert re.search(r"cached 6, already up to date 0, failed 0, .*\(by 2 processes\)", text.stdout), text.stdout
    names = sorted(p.name.split("-")[0] for p in cache.glob("*_k5tk_te.safetensors"))  # captions need no pixels
    assert names == ["broken", *(f"img{i}" for i in range(5))]
    # an item gone from the dataset: its cache is deleted once, though the other process never saw it
    (media / "img4.png").unlink()
    again = launch(accelerate_launch(2, *common, *vae, "--skip_existing", script="kandinsky5_cache_latents.py"), 1)
    assert re.search(r"cached 0, already up to date 4, failed 1, stale caches deleted 1", again.stdout), again.stdout
    assert len(list(cache.glob("*_k5tk.safetensors"))) == 4


def test_an_fsdp_state_of_two_processes_resumes_with_three_and_with_one(tiny_tree, cached_dataset, tmp_path):
    """#36: a state saved mid-epoch by 2 FSDP processes, continued by 3 FSDP processes and by one process
    alone; each says how the epoch position maps and runs to its last step."""
    from safetensors import safe_open

    _, config, _ = cached_dataset
    seven = tmp_path / "seven.toml"
    seven.write_text(config.read_text().replace("batch_size = 2", "batch_size = 1\nnum_repeats = 3"))
    saving = ("--max_train_steps", "1", "--save_every_n_steps", "1", "--save_state")
    launch(accelerate_launch(2, *train_args(tiny_tree, seven, tmp_path / "two", *saving), config_file=FSDP_CONFIG))
    state = tmp_path / "two" / "lora-step00000001-state"
    for processes, config_file, steps in ((3, FSDP_CONFIG, 3), (1, None, 2)):
        out = tmp_path / f"resumed_{processes}"
        options = ("--max_train_steps", str(steps), "--resume", str(state))
        command = accelerate_launch(processes, *train_args(tiny_tree, seven, out, *options), config_file=config_file)
        result = launch(command)
        assert f"the state was saved by 2 process(es), this run has {processes}: 2 batches of epoch 1 were done" in (
            result.stdout
        )
        with safe_open(str(out / "lora.safetensors"), "pt") as f:
            assert f.metadata()["ss_steps"] == str(steps)
        if processes > 1:
            assert len(re.findall(r"process \d: LoRA checksum", result.stdout)) == 3
