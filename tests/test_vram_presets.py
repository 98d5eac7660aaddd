"""--vram: the memory options chosen per task and GPU size from the measured stage figures, printed,
overridden by explicit options, and a refusal before anything loads where nothing fits."""

from __future__ import annotations

import pytest

import kandinsky5_generate_video
import kandinsky5_train_network
from kandinsky5.model.memory_presets import (
    VRAM_CHOICES,
    VramError,
    budget,
    generation_choice,
    training_choice,
    video_tokens,
)
from kandinsky5.model.tasks import get_task

from .generation_helpers import generate
from .training_helpers import train_args

SD_5S = video_tokens(121, 768, 512)
HD_10S = video_tokens(241, 1024, 1024)


def test_every_choice_fits_its_budget_and_smaller_gpus_take_more_options():
    for name, tokens in (("k5-lite-t2v-5s-sd", SD_5S), ("k5-pro-t2v-5s-sd", SD_5S), ("k5-lite-t2i-hd", 4096)):
        task, swapped = get_task(name), []
        for vram in sorted(VRAM_CHOICES, reverse=True):
            choice = generation_choice(task, tokens, vram)
            assert all(peak <= budget(vram) for peak in choice.peaks.values()), (name, vram, choice)
            swapped.append(choice.options["blocks_to_swap"])
        assert swapped == sorted(swapped), (name, swapped)  # never fewer blocks swapped on a smaller GPU


def test_the_presets_people_expect_for_generation():
    lite, pro = get_task("k5-lite-t2v-5s-sd"), get_task("k5-pro-t2v-5s-sd")
    assert generation_choice(lite, SD_5S, 80).options == {
        "text_encoder_dtype": "bfloat16",
        "fp8_base": False,
        "blocks_to_swap": 0,
        "separate_cfg_passes": False,
        "vae_tiling": True,
    }
    on_24 = generation_choice(pro, SD_5S, 24).options
    assert on_24["fp8_base"] and on_24["blocks_to_swap"] > 0  # Pro's 19 GiB of fp8 weights do not fit beside a step
    assert generation_choice(pro, SD_5S, 16).options["text_encoder_dtype"] == "fp8"  # Qwen's 15.4 GiB in bf16
    assert generation_choice(pro, SD_5S, 24).options["text_encoder_dtype"] == "bfloat16"


def test_what_cannot_fit_is_refused_with_a_message():
    with pytest.raises(VramError, match=r"--vram 12: a k5-pro-t2v-10s-hd LoRA step at .* tokens needs about"):
        training_choice(get_task("k5-pro-t2v-10s-hd"), HD_10S, 12)


def test_generation_with_vram_prints_its_choice_and_keeps_explicit_options(tiny_tree, tmp_path, capsys):
    common = ["--prompt", "a fox", "--steps", "1"]
    generate(tiny_tree, "tiny-t2v", *common, "--vram", "12", "--output", str(tmp_path / "a.mp4"))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("--vram 12:"))
    assert "--text_encoder_dtype fp8" in line and "estimated peaks: text encoding about 9.8 GiB" in line
    generate(tiny_tree, "tiny-t2v", *common, "--vram", "12", "--text_encoder_dtype", "float32",
             "--output", str(tmp_path / "b.mp4"))  # fmt: skip
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("--vram 12:"))
    assert "kept as given: --text_encoder_dtype float32" in line
    assert "(the preset's estimated peaks, not counting the options kept as given: text encoding about 9.8" in line
    assert (tmp_path / "a.mp4").exists() and (tmp_path / "b.mp4").exists()


def test_training_with_vram_24_prints_its_choice_and_trains(tiny_tree, cached_dataset, tmp_path, capsys):
    _, _, video_only = cached_dataset
    kandinsky5_train_network.main(train_args(tiny_tree, video_only, tmp_path, "--max_train_steps", "2", "--vram", "24"))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("--vram 24:"))
    assert "--gradient_checkpointing" in line and "estimated peaks: training step about" in line
    assert (tmp_path / "lora.safetensors").exists()


def test_a_refused_preset_stops_before_anything_loads(tiny_tree, tmp_path):
    # a Pro 10 s HD DiT is not needed: the preset is checked before the checkpoint is opened
    with pytest.raises(SystemExit, match="--vram 12: a k5-pro-t2v-10s-hd step at .* needs about"):
        kandinsky5_generate_video.main(
            ["--task", "k5-pro-t2v-10s-hd", "--prompt", "x", "--width", "1024", "--height", "1024", "--vram", "12",
             "--dit", "nowhere.safetensors"]
        )  # fmt: skip
