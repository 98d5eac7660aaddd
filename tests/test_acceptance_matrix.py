"""The matrix users run: every mixed precision with every memory option on Lite- and Pro-shaped T2V
training, bf16 training of I2V and T2I, and generation of every task kind in every dtype.

Training runs the real entry point in this process (a subprocess per cell would spend most of the
suite's time starting Python); accelerate's process-wide state is reset between cells, as a new
process would have it.
"""

import math

import av
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

import kandinsky5_train_network

from .generation_helpers import generate
from .media_factory import caption, write_image
from .training_helpers import cache_both

PRECISIONS = ["no", "bf16", "fp16"]
MEMORY = {
    "plain": [],
    "checkpointing": ["--gradient_checkpointing"],
    "offload": ["--gradient_checkpointing", "--gradient_checkpointing_cpu_offload"],
    "fp8": ["--fp8_base"],
    "swap": ["--blocks_to_swap", "2"],
}
MODELS = {"lite": ("tiny-t2v", "tiny_t2v"), "pro": ("tiny-pro-t2v", "tiny_pro_t2v")}
# Options that change how the same numbers are computed, not which: their LoRAs equal the plain run's.
EXACT = ("checkpointing", "offload", "swap")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def train(tree, config, out, task, dit, precision, *extra) -> dict[str, torch.Tensor]:
    AcceleratorState._reset_state(reset_partial_state=True)
    kandinsky5_train_network.main(
        [
            "--task",
            task,
            "--dit",
            str(tree / "model" / f"{dit}.safetensors"),
            "--dataset_config",
            str(config),
            "--output_dir",
            str(out),
            "--mixed_precision",
            precision,
            "--max_data_loader_n_workers",
            "0",
            "--max_train_steps",
            "2",
            "--network_dim",
            "4",
            "--learning_rate",
            "1e-3",
            "--seed",
            "7",
            *extra,
        ]
    )
    lora = load_file(str(out / "lora.safetensors"))
    assert lora and all(torch.isfinite(t).all() for t in lora.values())
    assert any(k.endswith("lora_up.weight") and t.abs().sum() > 0 for k, t in lora.items()), "the LoRA did not train"
    return lora


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_in_every_precision_with_every_memory_option(tiny_tree, cached_dataset, tmp_path, precision, model):
    _, _, video_only = cached_dataset
    task, dit = MODELS[model]
    loras = {
        name: train(tiny_tree, video_only, tmp_path / name, task, dit, precision, *flags)
        for name, flags in MEMORY.items()
    }
    for name in EXACT:
        for key, value in loras["plain"].items():
            torch.testing.assert_close(loras[name][key], value, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
    assert loras["fp8"].keys() == loras["plain"].keys()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_samples_and_validation_during_mixed_precision_training(tiny_tree, cached_dataset, tmp_path, capsys, precision):
    _, _, video_only = cached_dataset
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --f 5 --s 2\n")
    encoders = ["--vae", str(tiny_tree / "vae"), "--text_encoder_qwen", str(tiny_tree / "text_encoder")]
    encoders += ["--text_encoder_clip", str(tiny_tree / "text_encoder2")]
    out = tmp_path / "out"
    train(
        tiny_tree, video_only, out, "tiny-t2v", "tiny_t2v", precision, *encoders,
        "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--sample_at_first",
        "--validation_dataset_config", str(video_only), "--validate_every_n_steps", "1",
    )  # fmt: skip
    captured = capsys.readouterr()
    validation = [line for line in (captured.out + captured.err).splitlines() if "validation loss" in line]
    assert [line.split(":")[0] for line in validation] == ["step 1", "step 2"]
    assert all(math.isfinite(float(line.split()[-1])) for line in validation)
    assert sorted((out / "sample").iterdir()) == [out / "sample" / "step00000000", out / "sample" / "step00000002"]
    for folder in (out / "sample").iterdir():
        with av.open(str(next(folder.glob("*.mp4")))) as video:
            frames = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
        assert len(frames) == 5 and frames[0].std() > 0


def test_i2v_training_in_bf16(tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset
    train(tiny_tree, video_only, tmp_path, "tiny-i2v", "tiny_t2v", "bf16", "--gradient_checkpointing")


def test_t2i_training_in_bf16(tiny_tree, tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(2):
        caption(write_image(tmp_path / "images" / f"{i}.png", 64, 48, seed=i), f"a red apple, picture {i}")
    config = tmp_path / "images.toml"
    config.write_text(f'[[datasets]]\nimage_directory = "{tmp_path / "images"}"\nresolution = 64\nbatch_size = 2\n')
    cache_both(tiny_tree, config, "tiny-t2i", tiny_tree / "flux/vae")
    train(tiny_tree, config, tmp_path / "out", "tiny-t2i", "tiny_t2i", "bf16", "--fp8_base")


GENERATION = {
    "tiny-t2v": [],
    "tiny-pro-t2v": [],
    "tiny-i2v": ["--image"],
    "tiny-t2i": [],
    "tiny-i2i": ["--image"],
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("task", list(GENERATION))
def test_generation_of_every_task_kind_in_every_dtype(tiny_tree, tmp_path, task, dtype):
    extra = []
    if GENERATION[task]:
        extra = ["--image", str(write_image(tmp_path / "source.png", 64, 48, seed=4))]
    video = task.endswith("v")
    output = tmp_path / ("out.mp4" if video else "out.png")
    generate(tiny_tree, task, "--prompt", "a boat", "--steps", "2", "--dtype", dtype, "--output", str(output), *extra)
    if video:
        with av.open(str(output)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 9
    else:
        frames = [np.asarray(Image.open(output))]
    assert frames[0].std() > 0  # decoded from a finite latent (NaN decodes to one flat colour)
