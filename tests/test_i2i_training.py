"""Image-editing (I2I) LoRA training from source/target pairs: caching, the DiT's inputs against
generation's, bf16 training through accelerate, and generation with the trained LoRA."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import kandinsky5_cache_latents
import kandinsky5_cache_text_encoder_outputs
from dataset.config import load_dataset_config
from dataset.training_data import find_samples, load_batch
from kandinsky5.inference.denoiser import i2i_channels
from kandinsky5.inference.sampling import flow_schedule
from kandinsky5.model.checkpoint import load_dit
from kandinsky5.model.dit import DiffusionTransformer3D
from kandinsky5.model.tasks import get_task
from kandinsky5.training.flow_matching import noisy_latents
from kandinsky5.training.timesteps import sample_timesteps
from kandinsky5.training.train import training_loss

from .generation_helpers import accelerate_launch, generate
from .media_factory import caption, write_image
from .test_mixed_precision import training_args
from .training_helpers import ROOT, fixed_noise_loss

TASK = "tiny-i2i"
EDIT = "make the picture negative"


def write_pairs(root, bad: bool):
    """Targets (the edit done: colours inverted) in targets/, their sources in sources/ by name;
    with ``bad``, a target without a source, a source of another size and an unreadable source."""
    targets, sources = root / "targets", root / "sources"
    targets.mkdir(parents=True)
    sources.mkdir()
    for i in range(2):
        source = write_image(sources / f"pair{i}.png", 64, 64, seed=i)
        Image.fromarray(255 - np.asarray(Image.open(source))).save(targets / f"pair{i}.png")
        caption(targets / f"pair{i}.png", EDIT)
    if bad:
        caption(write_image(targets / "alone.png", 64, 64, seed=5), EDIT)
        caption(write_image(targets / "sized.png", 64, 64, seed=6), EDIT)
        write_image(sources / "sized.jpg", 48, 64, seed=6)
        caption(write_image(targets / "broken.png", 64, 64, seed=7), EDIT)
        (sources / "broken.png").write_bytes(b"not an image")
    config = root / "edits.toml"
    config.write_text(
        f'[[datasets]]\nimage_directory = "{targets}"\ncontrol_directory = "{sources}"\n'
        f'cache_directory = "{root / "cache"}"\nresolution = 64\n'
    )
    return config


def cache(tiny_tree, config):
    common = ["--dataset_config", str(config), "--task", TASK]
    kandinsky5_cache_latents.main([*common, "--vae", str(tiny_tree / "flux/vae")])
    encoders = ["--text_encoder_qwen", str(tiny_tree / "text_encoder")]
    kandinsky5_cache_text_encoder_outputs.main(
        [*common, *encoders, "--text_encoder_clip", str(tiny_tree / "text_encoder2")]
    )


@pytest.fixture(scope="module")
def pairs(tiny_tree, tmp_path_factory):
    root = tmp_path_factory.mktemp("edits")
    config = write_pairs(root, bad=False)
    cache(tiny_tree, config)
    return root, config


def test_bad_pairs_fail_alone_naming_both_files_and_the_rest_is_cached(tiny_tree, tmp_path, capsys):
    config = write_pairs(tmp_path, bad=True)
    common = ["--dataset_config", str(config), "--task", TASK]
    encoders = ["--text_encoder_qwen", str(tiny_tree / "text_encoder")]
    encoders += ["--text_encoder_clip", str(tiny_tree / "text_encoder2")]
    for step, extra in (
        (kandinsky5_cache_latents, ["--vae", str(tiny_tree / "flux/vae")]),
        (kandinsky5_cache_text_encoder_outputs, encoders),
    ):
        with pytest.raises(SystemExit) as stop:
            step.main([*common, *extra])
        assert stop.value.code == 1
        lines = capsys.readouterr().out.splitlines()
        assert any("cached 2, already up to date 0, failed 3" in line for line in lines), lines
        assert any("alone.png" in line and "no alone.<image extension> in" in line for line in lines)
        assert any("sized.png" in line and "sized.jpg is 48x64, the target 64x64" in line for line in lines)
        assert any("targets/broken.png" in line and "sources/broken.png" in line for line in lines)
    (entry,) = [find_samples(d) for d in load_dataset_config(config)]
    assert sorted(s.latent_file.name.split("-")[0] for s in entry.samples) == ["pair0", "pair1"]


def test_the_training_loss_gives_the_dit_what_i2i_generation_gives_it(tiny_tree, pairs, tmp_path, monkeypatch):
    """The same pair and prompt: the source latent and mask channels, the text, its mask and the
    pooled text the DiT sees inside the training loss equal those of I2I generation; the time is
    sigma * 1000 in fp32 in both."""
    root, config = pairs
    task = get_task(TASK)
    dit = load_dit(tiny_tree / "model/tiny_i2i.safetensors", task, dtype=torch.float32)
    calls, forward = [], DiffusionTransformer3D.forward

    def recorded(self, *args, **kwargs):  # every DiT call, generation's model included
        calls.append((args, kwargs))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionTransformer3D, "forward", recorded)
    (entry,) = [find_samples(d) for d in load_dataset_config(config)]
    sample = next(s for s in entry.samples if s.latent_file.name.startswith("pair0"))
    generator = torch.Generator().manual_seed(5)
    training_loss(dit, load_batch([sample]), task, training_args(), "cpu", generator)
    (train_args, train_kwargs), calls[:] = calls[0], []

    generate(
        tiny_tree, TASK, "--image", str(root / "sources" / "pair0.png"), "--prompt", EDIT, "--guidance", "1",
        "--seed", "0", "--width", "64", "--height", "64", "--steps", "1", "--output", str(tmp_path / "e.png"),
        "--no_expand_prompt",  # the caption as typed, as training reads it
    )  # fmt: skip
    (gen_args, gen_kwargs) = calls[0]
    x_train, text_train, pooled_train, time_train = train_args
    x_gen, text_gen, pooled_gen, time_gen = gen_args
    assert x_train.shape == x_gen.shape and x_train.shape[-1] == 33
    assert torch.equal(x_train[..., 16:], x_gen[..., 16:])  # the source latent and the mask of ones
    assert bool((x_train[..., 32] == 1).all())
    assert torch.equal(text_train, text_gen) and torch.equal(pooled_train, pooled_gen)
    mask_train, mask_gen = train_kwargs.get("text_mask"), gen_kwargs.get("text_mask")
    assert (mask_train is None or bool(mask_train.all())) and (mask_gen is None or bool(mask_gen.all()))
    sigma = flow_schedule(1, task.scheduler_scale, "cpu")[0]
    assert time_gen.dtype == time_train.dtype == torch.float32 and torch.equal(time_gen, (sigma * 1000).reshape(1))
    args, again = training_args(), torch.Generator().manual_seed(5)  # the draws training_loss made
    noise = torch.randn(x_train[..., :16].shape, generator=again)
    t = sample_timesteps(1, args.timestep_sampling, again, discrete_flow_shift=args.discrete_flow_shift)
    assert torch.equal(time_train, t * 1000.0)
    x0 = load_batch([sample])["latents"]
    assert torch.equal(x_train[..., :16], noisy_latents(x0, noise, t))  # the noisy target, the loss's subject


def edit_loss(tree, config, lora=None) -> float:
    """The flow-matching loss of the pairs at fixed noise and times, with the LoRA merged."""
    return fixed_noise_loss(
        tree, config, TASK, "tiny_i2i.safetensors", lambda batch: i2i_channels(batch["control"]), lora
    )


def test_bf16_training_through_accelerate_learns_the_edit_and_generation_uses_the_lora(tiny_tree, pairs, tmp_path):
    root, config = pairs
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{EDIT} --i {root / 'sources' / 'pair1.png'} --s 2\n")
    samples = ["--sample_prompts", str(prompts), "--sample_every_n_steps", "30", "--vae", str(tiny_tree / "flux/vae")]
    samples += ["--text_encoder_qwen", str(tiny_tree / "text_encoder")]
    samples += ["--text_encoder_clip", str(tiny_tree / "text_encoder2")]
    command = accelerate_launch(
        1,
        "--task", TASK, "--dit", str(tiny_tree / "model/tiny_i2i.safetensors"), "--dataset_config", str(config),
        "--output_dir", str(out), "--output_name", "edit", "--mixed_precision", "bf16", "--sdpa",
        "--max_data_loader_n_workers", "0", "--network_dim", "8", "--learning_rate", "5e-3",
        "--max_train_steps", "30", "--timestep_sampling", "uniform", *samples,
    )  # fmt: skip
    command[command.index("--mixed_precision") + 1] = "bf16"  # accelerate's own flag, as the docs show it
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = edit_loss(tiny_tree, config), edit_loss(tiny_tree, config, out / "edit.safetensors")
    assert after < 0.8 * before, (before, after)
    (sample,) = (out / "sample" / "step00000030").iterdir()  # the prompt line's source went with it
    assert sample.suffix == ".png" and json.loads(Image.open(sample).text["kandinsky5"])["image"].endswith("pair1.png")
    generate(
        tiny_tree, TASK, "--prompt", EDIT, "--image", str(root / "sources" / "pair1.png"), "--steps", "2",
        "--lora_weight", str(out / "edit.safetensors"), "--output", str(tmp_path / "edited.png"),
    )  # fmt: skip
    assert Image.open(tmp_path / "edited.png").size[0] > 0


def test_an_image_dataset_without_sources_says_what_i2i_caching_needs(tiny_tree, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    caption(write_image(tmp_path / "images" / "a.png", 64, 64), EDIT)
    config = tmp_path / "plain.toml"
    config.write_text(f'[[datasets]]\nimage_directory = "{tmp_path / "images"}"\nresolution = 64\n')
    with pytest.raises(SystemExit):
        kandinsky5_cache_latents.main(
            ["--dataset_config", str(config), "--task", TASK, "--vae", str(tiny_tree / "flux/vae")]
        )
    assert "a.png: image editing needs the source image of this target: give the dataset a control_directory" in (
        capsys.readouterr().out
    )
