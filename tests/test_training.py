import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import kandinsky5_train_network
from dataset.config import load_dataset_config
from dataset.training_data import EpochBatches, find_samples, load_batch
from kandinsky5.model.checkpoint import load_dit
from kandinsky5.model.tasks import get_task
from kandinsky5.training.flow_matching import flow_matching_loss
from kandinsky5.training.timesteps import sample_timesteps
from kandinsky5.training.train import training_loss
from networks.lora_kandinsky import create_network

from .generation_helpers import accelerate_launch, sampled_latent
from .media_factory import caption, write_image
from .training_helpers import ROOT, cache_both, fixed_noise_loss, train_args


def fixed_loss(tree, config, lora_file=None, multiplier=1.0) -> float:
    """Flow-matching loss on the cached clip at fixed noise and timesteps, with the LoRA merged."""
    return fixed_noise_loss(
        tree, config, "tiny-t2v", "tiny_t2v.safetensors", lambda batch: torch.zeros(*batch["latents"].shape[:4], 17),
        lora_file, multiplier, rope_scale=(1.0, 2.0, 2.0),
    )  # fmt: skip


def test_accelerate_launch_training_memorizes_and_the_lora_works_in_generation(tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset
    out = tmp_path / "out"
    command = accelerate_launch(
        1,
        *train_args(
            tiny_tree,
            video_only,
            out,
            "--network_dim",
            "8",
            "--network_alpha",
            "4",
            "--learning_rate",
            "5e-3",
            "--max_train_steps",
            "30",
            "--timestep_sampling",
            "uniform",
            "--save_every_n_steps",
            "10",
        ),
    )
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    final = out / "lora.safetensors"
    assert sorted(p.name for p in out.iterdir()) == [
        "lora-step00000010.safetensors",
        "lora-step00000020.safetensors",
        "lora-step00000030.safetensors",
        "lora.safetensors",
    ]
    before, after = fixed_loss(tiny_tree, video_only), fixed_loss(tiny_tree, video_only, final)
    assert after < 0.8 * before, (before, after)

    weights = load_file(str(final))
    modules = {k.rsplit(".", 2)[0] for k in weights if k.endswith("lora_down.weight")}
    assert len(modules) == 2 * 6 + 3 * 10 and len(weights) == 3 * len(modules)
    key = "lora_unet_visual_transformer_blocks_1_cross_attention_to_key"
    assert weights[f"{key}.lora_down.weight"].shape == (8, 64) and weights[f"{key}.lora_up.weight"].shape == (64, 8)
    assert weights[f"{key}.alpha"].item() == 4.0
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0" and meta["ss_steps"] == "30"
    assert meta["modelspec.architecture"] == "Kandinsky-5/lora" and meta["ss_base_model_version"] == "kandinsky5"

    base = sampled_latent(tiny_tree, tmp_path, "base", prompt="a red square")
    zero = sampled_latent(
        tiny_tree, tmp_path, "zero", "--lora_weight", str(final), "--lora_multiplier", "0", prompt="a red square"
    )
    with_lora = sampled_latent(tiny_tree, tmp_path, "with", "--lora_weight", str(final), prompt="a red square")
    assert torch.equal(zero, base) and not torch.allclose(with_lora, base, atol=1e-4)


def network_and_batch(tree, config, task_name="tiny-t2v"):
    dit = load_dit(tree / "model/tiny_t2v.safetensors", get_task(task_name), dtype=torch.float32)
    network = create_network(dit, 4, 4)
    network.apply_to(dit)
    with torch.no_grad():  # a non-zero LoRA so its gradients flow everywhere
        for lora in network.loras.values():
            lora.lora_up.weight.normal_(0, 0.02)
    samples = [find_samples(d) for d in load_dataset_config(config)]
    return dit, network, samples


Args = kandinsky5_train_network.parser().parse_args(["--timestep_sampling", "uniform"])  # the defaults otherwise


def test_only_lora_parameters_change(tiny_tree, cached_dataset):
    _, config, _ = cached_dataset
    dit, network, samples = network_and_batch(tiny_tree, config)
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    lora_before = {k: v.clone() for k, v in network.state_dict().items()}
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    data = EpochBatches(samples, seed=0)
    for i in range(3):
        loss = training_loss(dit, data[(0, i % len(data))], get_task("tiny-t2v"), Args, "cpu")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(base[k], v) for k, v in dit.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in dit.parameters())  # nothing of the DiT trains
    assert any(not torch.equal(lora_before[k], v) for k, v in network.state_dict().items() if "lora_down" in k)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_tree, cached_dataset):
    _, config, _ = cached_dataset
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation, noise and timesteps in both runs
        dit, network, samples = network_and_batch(tiny_tree, config)
        dit.gradient_checkpointing = checkpointing
        loss = training_loss(dit, load_batch(samples[0].samples), get_task("tiny-t2v"), Args, "cpu")
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in network.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.allclose(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-8) for n in grads_a)


def test_batch_size_two_with_captions_of_different_lengths_trains(tiny_tree, cached_dataset, tmp_path):
    _, config, _ = cached_dataset
    (_, images) = [find_samples(d) for d in load_dataset_config(config)]
    batch = load_batch(images.samples)
    assert batch["latents"].shape[0] == 2 and batch["text_mask"].sum(1).tolist()[0] != batch["text_mask"].sum(1)[1]
    assert batch["text_padded"] and not load_batch(images.samples[:1])["text_padded"]
    kandinsky5_train_network.main(
        train_args(tiny_tree, config, tmp_path, "--max_train_steps", "4", "--gradient_accumulation_steps", "2")
    )
    assert (tmp_path / "lora.safetensors").exists()


@pytest.mark.parametrize("mode", ["uniform", "sigmoid", "shift", "logit_normal"])
def test_timestep_sampling_stays_within_min_and_max(mode):
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(4000, mode, g, discrete_flow_shift=3.0, logit_mean=0.5, min_timestep=200, max_timestep=700)
    assert t.min() >= 0.2 and t.max() <= 0.7 and t.std() > 0.02
    full = sample_timesteps(4000, mode, torch.Generator().manual_seed(0), discrete_flow_shift=3.0)
    assert full.min() >= 0 and full.max() <= 1


def test_shift_moves_timesteps_towards_noise():
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert sample_timesteps(4000, "shift", g(), discrete_flow_shift=5.0).mean() > (
        sample_timesteps(4000, "sigmoid", g()).mean() + 0.15
    )


def test_i2v_loss_leaves_the_clean_first_frame_out():
    x0, noise = torch.randn(1, 3, 2, 2, 16), torch.randn(1, 3, 2, 2, 16)
    prediction = noise - x0
    weight = torch.tensor([0.0, 1.0, 1.0])
    changed = prediction.clone()
    changed[:, 0] += 5.0
    assert flow_matching_loss(prediction, x0, noise, weight) == 0
    assert flow_matching_loss(changed, x0, noise, weight) == 0 and flow_matching_loss(changed, x0, noise) > 0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--optimizer_type", "Lion"], "unknown --optimizer_type 'Lion'"),
        (["--optimizer_args", "weight_decay"], "--optimizer_args 'weight_decay': expected key=value"),
        (["--optimizer_args", "betas=(0.9,"], "is not a Python literal"),
        (["--optimizer_args", "momentum=0.9"], "--optimizer_args do not fit AdamW"),
        (["--optimizer_type", "AdamW8bit"], "needs a CUDA GPU"),
        (["--network_args", "rank=4"], "--network_args 'rank=4': expected key=value with key one of"),
        (["--gradient_checkpointing_cpu_offload"], "needs --gradient_checkpointing"),
        (["--min_timestep", "900", "--max_timestep", "100"], "need 0 <= --min_timestep < --max_timestep"),
    ],
)
def test_bad_options_are_clear_errors(tiny_tree, cached_dataset, tmp_path, extra, message):
    _, config, _ = cached_dataset
    with pytest.raises(SystemExit, match=message):
        kandinsky5_train_network.main(train_args(tiny_tree, config, tmp_path, "--max_train_steps", "1", *extra))


def test_options_from_a_config_file_and_the_command_line_wins(tiny_tree, cached_dataset, tmp_path):
    _, config, _ = cached_dataset
    settings = tmp_path / "train.toml"
    settings.write_text(f"""
[model]
task = "tiny-t2v"
dit = "{tiny_tree / "model/tiny_t2v.safetensors"}"
[training]
dataset_config = "{config}"
output_dir = "{tmp_path / "out"}"
output_name = "from_file"
max_train_steps = 2
network_dim = 2
mixed_precision = "no"
max_data_loader_n_workers = 0
""")
    kandinsky5_train_network.main(["--config_file", str(settings), "--network_dim", "3"])
    weights = load_file(str(tmp_path / "out" / "from_file.safetensors"))
    assert weights["lora_unet_text_transformer_blocks_0_feed_forward_in_layer.lora_down.weight"].shape[0] == 3
    settings.write_text(settings.read_text() + "learning_rat = 1\n")
    with pytest.raises(SystemExit, match="unknown option\\(s\\) learning_rat"):
        kandinsky5_train_network.main(["--config_file", str(settings)])


def test_training_without_caches_says_what_to_do(tiny_tree, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "d.toml").write_text(f'[[datasets]]\nimage_directory = "{tmp_path / "empty"}"\n')
    with pytest.raises(SystemExit, match="no training samples .* run the caching commands first"):
        kandinsky5_train_network.main(train_args(tiny_tree, tmp_path / "d.toml", tmp_path / "o"))


def test_i2v_training_runs_on_clips_with_their_first_frame(tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset
    (entry,) = [find_samples(d) for d in load_dataset_config(video_only)]
    assert "first_frame" in load_batch(entry.samples)
    kandinsky5_train_network.main(
        train_args(tiny_tree, video_only, tmp_path, "--max_train_steps", "2") + ["--task", "tiny-i2v"]
    )
    assert (tmp_path / "lora.safetensors").exists()


def test_t2i_trains_on_images_cached_with_the_image_vae(tiny_tree, tmp_path):
    (tmp_path / "imgs").mkdir()
    caption(write_image(tmp_path / "imgs" / "a.png", 64, 64), "an apple")
    config = tmp_path / "d.toml"
    config.write_text(f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\nresolution = 64\n')
    cache_both(tiny_tree, config, "tiny-t2i", tiny_tree / "flux/vae")
    args = [
        "--task",
        "tiny-t2i",
        "--dit",
        str(tiny_tree / "model/tiny_t2i.safetensors"),
        "--dataset_config",
        str(config),
        "--output_dir",
        str(tmp_path / "out"),
        "--mixed_precision",
        "no",
        "--max_data_loader_n_workers",
        "0",
        "--max_train_steps",
        "2",
    ]
    kandinsky5_train_network.main(args)
    assert (tmp_path / "out" / "lora.safetensors").exists()
    with pytest.raises(SystemExit, match="was cached with the flux VAE, but task tiny-t2v needs hunyuan latents"):
        kandinsky5_train_network.main(
            args + ["--task", "tiny-t2v", "--dit", str(tiny_tree / "model/tiny_t2v.safetensors")]
        )


@pytest.mark.parametrize("optimizer", [["Adafactor"], ["torch.optim.SGD", "--optimizer_args", "momentum=0.9"]])
def test_other_optimizers_and_tensorboard_logs(tiny_tree, cached_dataset, tmp_path, optimizer):
    _, _, video_only = cached_dataset
    kandinsky5_train_network.main(
        train_args(
            tiny_tree,
            video_only,
            tmp_path / "out",
            "--max_train_steps",
            "2",
            "--logging_dir",
            str(tmp_path / "logs"),
            "--optimizer_type",
            *optimizer,
        )
    )
    assert (tmp_path / "out" / "lora.safetensors").exists()
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_loraplus_puts_the_up_matrices_in_their_own_group(tiny_tree):
    dit = load_dit(tiny_tree / "model/tiny_t2v.safetensors", get_task("tiny-t2v"))
    network = create_network(dit, 4, 4, network_args=["loraplus_lr_ratio=16", "exclude_patterns=['.*feed_forward.*']"])
    assert not any("feed_forward" in name for name in network.loras)
    down, up = network.parameter_groups(1e-4)
    assert up["lr"] == 16e-4 and all(p.shape[1] == 4 for p in up["params"]) and len(up["params"]) == len(down["params"])


def test_lora_trains_over_fp8_base_weights_that_stay_untouched(tiny_tree, cached_dataset, tmp_path):
    from modules.fp8 import FP8Linear

    _, _, video_only = cached_dataset
    dit = load_dit(tiny_tree / "model/tiny_t2v.safetensors", get_task("tiny-t2v"), dtype=torch.float32, fp8=True)
    network = create_network(dit, 4, 4)
    assert len(network.loras) == 42  # the LoRA sits on the fp8 layers too
    network.apply_to(dit)
    fp8_before = {k: v.clone() for k, v in dit.state_dict().items()}
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    batch = load_batch([find_samples(d) for d in load_dataset_config(video_only)][0].samples)
    for _ in range(2):
        training_loss(dit, batch, get_task("tiny-t2v"), Args, "cpu").backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(isinstance(m, FP8Linear) for m in dit.modules())
    assert all(torch.equal(fp8_before[k], v) for k, v in dit.state_dict().items())
    assert any(lora.lora_up.weight.abs().sum() > 0 for lora in network.loras.values())
    kandinsky5_train_network.main(
        train_args(tiny_tree, video_only, tmp_path, "--max_train_steps", "2", "--fp8_base", "--gradient_checkpointing")
    )
    assert (tmp_path / "lora.safetensors").exists()


def test_training_with_block_swap_gives_the_same_lora(tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset
    for name, extra in (("plain", []), ("swapped", ["--blocks_to_swap", "3", "--gradient_checkpointing"])):
        kandinsky5_train_network.main(
            train_args(tiny_tree, video_only, tmp_path / name, "--max_train_steps", "3", *extra)
        )
    plain, swapped = (load_file(str(tmp_path / n / "lora.safetensors")) for n in ("plain", "swapped"))
    assert all(torch.equal(plain[k], swapped[k]) for k in plain)


def test_the_lora_down_projection_keeps_the_bf16_input_not_an_fp32_copy():
    # q, k and v LoRAs share one bf16 input; autograd's fp32 copy per layer was twice its size each
    from networks.adapter_module import wide_linear as down_projection

    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 24, generator=g).to(torch.bfloat16).requires_grad_(True)
    weight = torch.randn(4, 24, generator=g).requires_grad_(True)
    grad = torch.randn(2, 5, 4, generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = down_projection(x, weight)
    assert out.dtype == torch.float32 and not any(t.dtype == torch.float32 and t.shape == x.shape for t in saved)
    out.backward(grad)
    x_ref, weight_ref = x.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    reference = torch.nn.functional.linear(x_ref.float(), weight_ref)
    reference.backward(grad)
    assert torch.equal(out, reference)
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, x_ref.grad)
    assert torch.equal(weight.grad, weight_ref.grad)


def test_nabla_training_on_dense_caches_says_to_recache_with_the_nabla_task(tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset  # cached for tiny-t2v: 64x64 frames
    with pytest.raises(SystemExit, match="64x64 px frames, but task tiny-t2v-nabla uses NABLA attention.*"
                       "re-cache the latents with --task tiny-t2v-nabla"):  # fmt: skip
        kandinsky5_train_network.main(
            train_args(tiny_tree, video_only, tmp_path, "--max_train_steps", "1") + ["--task", "tiny-t2v-nabla"]
        )
    assert not (tmp_path / "lora.safetensors").exists()
    with pytest.raises(SystemExit, match="64x64 px frames, but --force_nabla_attention asks for NABLA attention.*"
                       "re-cache the latents with a NABLA task of this model"):  # fmt: skip
        kandinsky5_train_network.main(
            train_args(tiny_tree, video_only, tmp_path, "--max_train_steps", "1", "--force_nabla_attention")
        )


def test_a_warmup_as_long_as_the_run_is_noted(tiny_tree, cached_dataset, tmp_path, capsys):
    _, _, video_only = cached_dataset
    args = train_args(tiny_tree, video_only, tmp_path, "--max_train_steps", "2", "--lr_warmup_steps", "5")
    kandinsky5_train_network.main(args)
    assert (
        "note: --lr_warmup_steps 5 is 5 steps, as long as or longer than the run (2 steps): the learning rate never "
        "reaches --learning_rate 0.0001" in capsys.readouterr().out
    )


def header_only_checkpoint(path, task_name: str):
    """A safetensors file with the real architecture's header and no data (a sparse file: nothing is
    written but the header), enough for every check that reads the header alone."""
    import json
    import struct

    from kandinsky5.model.checkpoint import expected_shapes

    header, offset = {}, 0
    for name, shape in expected_shapes(get_task(task_name).dit_params).items():
        size = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    return path


def test_a_real_shaped_dit_of_another_task_is_refused_before_training_loads_it(tiny_tree, cached_dataset, tmp_path):
    """As generation refuses it: the checkpoint's header names the task it fits."""
    _, _, video_only = cached_dataset
    lite_t2v = header_only_checkpoint(tmp_path / "kandinsky5lite_t2v_sft_5s.safetensors", "k5-lite-t2v-5s-sd")
    args = train_args(tiny_tree, video_only, tmp_path / "out")
    args[args.index("--task") + 1], args[args.index("--dit") + 1] = "k5-lite-i2i-hd", str(lite_t2v)
    with pytest.raises(SystemExit, match="does not fit task 'k5-lite-i2i-hd'.*k5-lite-t2v-5s-sd"):
        kandinsky5_train_network.main(args)
