"""LoHa, LoKr and DoRA trained through `accelerate launch` in bf16, and the EMA of the weights: kept
while training, saved beside each file, restored on --resume, and averaged afterwards (post-hoc)."""

from __future__ import annotations

import importlib
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kandinsky5.lora_tools import main as lora_tools
from kandinsky5.model.checkpoint import load_dit
from kandinsky5.model.tasks import get_task
from networks.lora_files import read_lora
from networks.lora_merge import merge_plan
from networks.post_hoc_ema import gamma_of

from .dit_helpers import random_inputs
from .generation_helpers import accelerate_launch, sampled_latent
from .training_helpers import ROOT, fixed_noise_loss, sampling_args, train_args

ADAPTERS = {
    "loha": ("networks.loha_kandinsky", []),
    "lokr": ("networks.lokr_kandinsky", ["factor=4"]),
    "dora": ("networks.lora_kandinsky", ["dora_wd=True"]),
}


def fixed_loss(tree, config, lora_file=None) -> float:
    return fixed_noise_loss(
        tree, config, "tiny-t2v", "tiny_t2v.safetensors", lambda batch: torch.zeros(*batch["latents"].shape[:4], 17),
        lora_file, rope_scale=(1.0, 2.0, 2.0),
    )  # fmt: skip


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_each_adapter_trains_in_bf16_and_generation_applies_what_training_had(
    adapter, tiny_tree, cached_dataset, tmp_path
):
    _, _, video_only = cached_dataset
    module, network_args = ADAPTERS[adapter]
    out = tmp_path / "out"
    options = ["--network_module", module, "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "5e-3",
               "--max_train_steps", "30", "--timestep_sampling", "uniform", "--mixed_precision", "bf16"]  # fmt: skip
    run(accelerate_launch(1, *train_args(tiny_tree, video_only, out, *options, "--network_args", *network_args)))
    final = out / "lora.safetensors"
    with safe_open(str(final), "pt") as f:
        assert f.metadata()["ss_network_module"] == module
    before, after = fixed_loss(tiny_tree, video_only), fixed_loss(tiny_tree, video_only, final)
    assert after < 0.9 * before, (before, after)

    # the network as training holds it, and the DiT generation loads with the file merged: one output
    task, dit_file = get_task("tiny-t2v"), tiny_tree / "model/tiny_t2v.safetensors"
    trained = load_dit(dit_file, task, dtype=torch.float32)
    network = importlib.import_module(module).create_network(trained, 4, 4, network_args=network_args)
    network.load_weights(final)
    network.eval().apply_to(trained)
    shapes = {n: tuple(m.weight.shape) for n, m in trained.named_modules() if isinstance(m, torch.nn.Linear)}
    merged = load_dit(dit_file, task, dtype=torch.float32, deltas=merge_plan([(read_lora(final), 1.0)], shapes))
    x, text, pooled, time = random_inputs(trained, 1, 3, 4, 4, 6)
    with torch.no_grad():
        outputs = [model(x, text, pooled, time, rope_scale=(1.0, 2.0, 2.0)) for model in (trained, merged)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)

    base = sampled_latent(tiny_tree, tmp_path, "base", "--no_expand_prompt")
    with_it = sampled_latent(tiny_tree, tmp_path, "with", "--no_expand_prompt", "--lora_weight", str(final))
    assert not torch.allclose(with_it, base, atol=1e-4)


def reference_ema(steps: dict[int, dict], decay: float, start: int, every: int, last: int) -> dict:
    """The EMA after step ``last``, from the weights recorded at each step."""
    average = None
    for step in range(1, last + 1):
        if step < start or (step - start) % every:
            continue
        weights = steps[step]
        if average is None:
            average = {k: v.clone() for k, v in weights.items()}
        else:
            average = {k: decay * average[k] + (1 - decay) * weights[k] for k in weights}
    return average


def test_the_ema_is_the_average_of_the_recorded_weights_and_resumes_exactly(tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --f 1 --s 2\n")
    ema = ["--ema_decay", "0.8", "--ema_start_step", "2", "--ema_update_every", "2"]
    common = ["--network_module", "networks.loha_kandinsky", "--network_dim", "4", "--learning_rate", "5e-3",
              "--max_train_steps", "7", "--save_every_n_steps", "1", "--save_state", *ema]  # fmt: skip
    extra = ["--validation_dataset_config", str(video_only), "--validate_every_n_steps", "4", "--sample_with_ema",
             "--sample_every_n_steps", "7", *sampling_args(tiny_tree, prompts)]  # fmt: skip
    first = run(accelerate_launch(1, *train_args(tiny_tree, video_only, tmp_path / "a", *common, *extra)))
    a = tmp_path / "a"
    steps = {s: load_file(str(a / f"lora-step{s:08d}.safetensors")) for s in range(1, 8)}
    assert not (a / "lora-step00000001-ema.safetensors").exists()  # the average starts at step 2
    for step in (2, 3, 6, 7):
        saved = load_file(str(a / f"lora-step{step:08d}-ema.safetensors"))
        expected = reference_ema(steps, 0.8, 2, 2, step)
        assert saved.keys() == expected.keys()
        for key in saved:
            torch.testing.assert_close(saved[key], expected[key], rtol=1e-6, atol=1e-7)
    with safe_open(str(a / "lora-ema.safetensors"), "pt") as f:
        assert f.metadata()["ss_ema_updates"] == "3" and f.metadata()["ss_ema_decay"] == "0.8"
    assert "validation loss" in first.stdout and "(EMA weights " in first.stdout
    assert (a / "sample").is_dir() and any((a / "sample").iterdir())

    # resumed at step 3 (one update in), the run ends with the same average, to the bit
    resume = ["--resume", str(a / "lora-step00000003-state")]
    run(accelerate_launch(1, *train_args(tiny_tree, video_only, tmp_path / "b", *common, *resume)))
    ended, resumed = load_file(str(a / "lora-ema.safetensors")), load_file(str(tmp_path / "b" / "lora-ema.safetensors"))
    assert all(torch.equal(ended[k], resumed[k]) for k in ended)

    # post-hoc: the step files averaged afterwards, in training order whatever the order given
    files = [str(a / f"lora-step{s:08d}.safetensors") for s in (5, 1, 3, 2, 4)]
    lora_tools(["ema", *files, "--output", str(tmp_path / "beta.safetensors"), "--beta", "0.7"])
    expected = reference_ema(steps, 0.7, 1, 1, 5)
    got = load_file(str(tmp_path / "beta.safetensors"))
    assert all(torch.allclose(got[k], expected[k], rtol=1e-6, atol=1e-7) for k in expected)
    lora_tools(["ema", *files, "--output", str(tmp_path / "power.safetensors"), "--sigma_rel", "0.2"])
    gamma = gamma_of(0.2)
    assert (gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)) == pytest.approx(0.2**2)
    average = {k: v.clone() for k, v in steps[1].items()}
    for k_file in range(2, 6):
        beta = (1 - 1 / k_file) ** (gamma + 1)
        average = {k: beta * average[k] + (1 - beta) * steps[k_file][k] for k in average}
    got = load_file(str(tmp_path / "power.safetensors"))
    assert all(torch.allclose(got[k], average[k], rtol=1e-6, atol=1e-7) for k in average)


def test_ema_options_need_the_decay(tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset
    import kandinsky5_train_network

    with pytest.raises(SystemExit) as stop:
        kandinsky5_train_network.arguments(train_args(tiny_tree, video_only, tmp_path, "--sample_with_ema"))
    assert stop.value.code == 2
    with pytest.raises(SystemExit, match="factor=0: expected a positive integer"):
        kandinsky5_train_network.arguments(
            train_args(
                tiny_tree,
                video_only,
                tmp_path,
                "--network_module",
                "networks.lokr_kandinsky",
                "--network_args",
                "factor=0",
            )  # fmt: skip
        )


def test_lokr_with_dora_and_ema_under_fsdp_equals_ddp(tiny_tree, cached_dataset, tmp_path):
    _, config, _ = cached_dataset
    configs = ROOT / "examples" / "accelerate"
    options = ["--network_module", "networks.lokr_kandinsky", "--network_args", "dora_wd=True", "factor=4",
               "--max_train_steps", "3", "--ema_decay", "0.5"]  # fmt: skip
    for name in ("fsdp", "ddp"):
        run(accelerate_launch(2, *train_args(tiny_tree, config, tmp_path / name, *options),
                              config_file=configs / f"{name}.yaml"))  # fmt: skip
    for file in ("lora.safetensors", "lora-ema.safetensors"):
        fsdp, ddp = load_file(str(tmp_path / "fsdp" / file)), load_file(str(tmp_path / "ddp" / file))
        assert fsdp.keys() == ddp.keys() and any(k.endswith("dora_scale") for k in fsdp)
        assert max(float((fsdp[k] - ddp[k]).abs().max()) for k in fsdp) <= 1e-6


@pytest.mark.parametrize("adapter", ["loha", "dora"])
def test_adapters_train_over_fp8_weights_with_block_swap(adapter, tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset
    module, network_args = ADAPTERS[adapter]
    options = ["--network_module", module, "--network_args", *network_args, "--max_train_steps", "2",
               "--fp8_base", "--blocks_to_swap", "1"]  # fmt: skip
    run(accelerate_launch(1, *train_args(tiny_tree, video_only, tmp_path / "out", *options)))
    weights = load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    started_at_zero = [t for k, t in weights.items() if k.endswith(("hada_w2_a", "lora_up.weight"))]
    assert started_at_zero and all(t.abs().sum() > 0 for t in started_at_zero)  # trained over the fp8 layers
    assert read_lora(tmp_path / "out" / "lora.safetensors").modules


def test_an_fsdp_runs_ema_is_saved_in_its_state_and_resumed_exactly(tiny_tree, cached_dataset, tmp_path):
    _, config, _ = cached_dataset
    fsdp = ROOT / "examples" / "accelerate" / "fsdp.yaml"
    options = ["--network_module", "networks.loha_kandinsky", "--max_train_steps", "3", "--ema_decay", "0.5",
               "--save_every_n_steps", "2", "--save_state"]  # fmt: skip
    run(accelerate_launch(2, *train_args(tiny_tree, config, tmp_path / "a", *options), config_file=fsdp))
    state = tmp_path / "a" / "lora-step00000002-state"
    with safe_open(str(state / "ema.safetensors"), "pt") as f:
        assert f.metadata()["ss_ema_updates"] == "2"
    resume = ["--resume", str(state)]
    run(accelerate_launch(2, *train_args(tiny_tree, config, tmp_path / "b", *options, *resume), config_file=fsdp))
    ended = load_file(str(tmp_path / "a" / "lora-ema.safetensors"))
    resumed = load_file(str(tmp_path / "b" / "lora-ema.safetensors"))
    assert ended.keys() == resumed.keys() and all(torch.equal(ended[k], resumed[k]) for k in ended)
