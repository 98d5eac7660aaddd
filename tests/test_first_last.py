"""First+last-frame I2V: --image_last and --loop in generation, the last frame in latent caches, and
--i2v_mode first_last training that gives the DiT the conditioning generation gives."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import kandinsky5_train_network
from dataset.config import load_dataset_config
from dataset.training_data import find_samples, load_batch
from kandinsky5.inference.denoiser import i2v_channels, with_last_frame
from kandinsky5.inference.prompt_file import parse_prompt_line
from kandinsky5.model.checkpoint import load_dit
from kandinsky5.model.tasks import get_task
from kandinsky5.training.train import training_loss

from .generation_helpers import accelerate_launch, generate
from .media_factory import frames as media_frames
from .test_published_presets import dit_inputs, first_frame_latent  # noqa: F401 (a fixture)
from .training_helpers import ROOT, fixed_noise_loss, sampling_args, train_args


def pictures(folder, seed=0):
    """The first and last frames of a clip as image files (the clip media_factory writes)."""
    first, *_, last = media_frames(9, 64, 64, seed)
    Image.fromarray(first).save(folder / "first.png")
    Image.fromarray(last).save(folder / "last.png")
    return folder / "first.png", folder / "last.png"


def check_layout(x, first, last):
    """Frame 0 replaced by the first frame with its mask; the last frame's latent in the last frame's
    conditioning channels with its mask; nothing else conditioned."""
    first, last = (t.to(x.dtype).expand(x.shape[0], -1, -1, -1, -1) for t in (first, last))
    assert torch.equal(x[:, :1, ..., :16], first)
    assert torch.equal(x[:, -1:, ..., 16:32], last)
    assert (x[:, 0, ..., 32] == 1).all() and (x[:, -1, ..., 32] == 1).all()
    assert (x[:, 1:-1, ..., 16:] == 0).all() and (x[:, 0, ..., 16:32] == 0).all()


def test_generation_puts_the_last_frame_in_the_last_frames_conditioning(tiny_tree, tmp_path, dit_inputs):  # noqa: F811
    first, last = pictures(tmp_path)
    common = ["--image", str(first), "--prompt", "waves", "--frames", "9", "--steps", "2", "--no_expand_prompt"]
    generate(tiny_tree, "tiny-i2v", *common, "--image_last", str(last), "--output", str(tmp_path / "a.mp4"))
    first_latent = first_frame_latent(tiny_tree, first, 64, 64, seed=42)
    last_latent = first_frame_latent(tiny_tree, last, 64, 64, seed=42)  # encoded alone, as the first frame
    assert dit_inputs
    for x in dit_inputs:
        check_layout(x, first_latent, last_latent)
    dit_inputs.clear()
    generate(tiny_tree, "tiny-i2v", *common, "--loop", "--output", str(tmp_path / "loop.mp4"))
    for x in dit_inputs:
        check_layout(x, first_latent, first_latent)  # the first image is the last frame too
    assert (tmp_path / "a.mp4").exists() and (tmp_path / "loop.mp4").exists()


def test_first_last_training_gives_the_dit_what_generation_gives(tiny_tree, cached_dataset, dit_inputs):  # noqa: F811
    _, _, video_only = cached_dataset
    task = get_task("tiny-i2v")
    dit = load_dit(tiny_tree / "model/tiny_t2v.safetensors", task, dtype=torch.float32)
    (entry,) = [find_samples(d) for d in load_dataset_config(video_only)]
    batch = load_batch(entry.samples)
    args = kandinsky5_train_network.parser().parse_args(
        ["--task", "tiny-i2v", "--dit", "x", "--dataset_config", "x", "--output_dir", "x", "--i2v_mode", "first_last"]
    )
    training_loss(dit, batch, task, args, "cpu")
    (x,) = dit_inputs
    check_layout(x, batch["first_frame"], batch["last_frame"])
    # the cache's last frame is the clip's last frame encoded alone, as generation encodes --image_last
    with safe_open(entry.samples[0].latent_file, "pt") as f:
        assert f.get_tensor("last_frame").shape == f.get_tensor("first_frame").shape == (1, 8, 8, 16)
    dit_inputs.clear()
    args.first_last_probability = 0.5  # each sample gets its last frame or not, drawn from the generator
    given = []
    for seed in range(8):
        training_loss(dit, batch, task, args, "cpu", generator=torch.Generator().manual_seed(seed))
        given.append(bool((dit_inputs[-1][:, -1, ..., 32] == 1).all()))
    assert any(given) and not all(given)


def test_a_first_only_cache_and_a_t2v_task_are_refused_for_first_last_training(tiny_tree, cached_dataset, tmp_path):
    root, _, video_only = cached_dataset
    copy = tmp_path / "copy"
    shutil.copytree(root / "cache_video", copy)
    for file in copy.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys() if k != "last_frame"}, f.metadata()
        save_file(tensors, str(file), metadata)
    config = tmp_path / "old.toml"
    config.write_text(video_only.read_text().replace(str(root / "cache_video"), str(copy)))
    with pytest.raises(SystemExit, match="hold no last frame, such as .*run kandinsky5_cache_latents.py"):
        kandinsky5_train_network.main(train_args(tiny_tree, config, tmp_path / "out", "--task", "tiny-i2v",
                                                 "--i2v_mode", "first_last", "--max_train_steps", "1"))  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        kandinsky5_train_network.arguments(
            train_args(tiny_tree, video_only, tmp_path, "--first_last_probability", "0.5")
        )
    assert stop.value.code == 2  # (argparse's message: it needs --i2v_mode first_last)
    with pytest.raises(SystemExit, match="--i2v_mode first_last is for image-to-video tasks; tiny-t2v is t2v"):
        kandinsky5_train_network.main(train_args(tiny_tree, video_only, tmp_path / "out", "--i2v_mode", "first_last",
                                                 "--max_train_steps", "1"))  # fmt: skip


def test_prompt_lines_take_musubis_end_image_key():
    line = parse_prompt_line("a wave --i a.png --ei b.png --f 9", 1)
    assert (line.image, line.image_last, line.frames) == ("a.png", "b.png", 9)


def test_a_first_last_lora_trains_in_bf16_under_accelerate_and_generates_with_a_last_frame_and_a_loop(
    tiny_tree, cached_dataset, tmp_path
):
    _, _, video_only = cached_dataset
    first, last = pictures(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a square slides --i {first} --ei {last} --f 9 --s 2\n")
    out = tmp_path / "out"
    options = ["--task", "tiny-i2v", "--i2v_mode", "first_last", "--network_dim", "8", "--learning_rate", "5e-3",
               "--max_train_steps", "30", "--timestep_sampling", "uniform", "--mixed_precision", "bf16",
               "--sample_every_n_steps", "30", *sampling_args(tiny_tree, prompts)]  # fmt: skip
    result = subprocess.run(accelerate_launch(1, *train_args(tiny_tree, video_only, out, *options)), cwd=ROOT,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((out / "sample").rglob("*.mp4"))  # the sample took its first and last frame

    def channels(batch):
        shape = tuple(batch["latents"].shape[:4])
        return with_last_frame(i2v_channels(shape, "cpu"), batch["last_frame"])

    lora = out / "lora.safetensors"
    losses = [fixed_noise_loss(tiny_tree, video_only, "tiny-i2v", "tiny_t2v.safetensors", channels, file,
                               rope_scale=(1.0, 2.0, 2.0)) for file in (None, lora)]  # fmt: skip
    assert losses[1] < 0.9 * losses[0], losses
    for extra in (["--image_last", str(last)], ["--loop"]):
        name = tmp_path / f"{extra[0][2:]}.mp4"
        generate(tiny_tree, "tiny-i2v", "--image", str(first), *extra, "--prompt", "a square slides", "--frames", "9",
                 "--steps", "2", "--no_expand_prompt", "--lora_weight", str(lora), "--output", str(name))  # fmt: skip
        assert name.exists()
