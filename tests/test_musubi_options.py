"""A musubi-tuner user's command lines and --config_file run unchanged: every option of musubi's common
training parser and Kandinsky 5 scripts is either implemented with musubi's meaning (tested here one
by one) or accepted with one notice saying why it changes nothing here."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import kandinsky5_generate_video
import kandinsky5_train_network
from kandinsky5.lora_tools import main as lora_tools
from kandinsky5.musubi_options import GENERATION_NOTICES, TRAINING_NOTICES
from kandinsky5.training.flow_matching import flow_matching_loss
from kandinsky5.training.musubi_runs import compile_options
from kandinsky5.training.timesteps import TimestepBuckets, loss_weights, resolution_shift, sample_timesteps

from .generation_helpers import generate
from .training_helpers import train_args


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Runs in other precisions than the rest of the suite's: accelerate's process-wide state is reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


MUSUBI_COMMAND = [
    "--weighting_scheme",
    "cosmap",
    "--mode_scale",
    "1.29",
    "--num_timestep_buckets",
    "4",
    "--preserve_distribution_shape",
    "--min_timestep",
    "100",
    "--max_timestep",
    "900",
    "--flow_shift",
    "5.0",
    "--guidance_scale",
    "1.0",
    "--scale_weight_norms",
    "1.0",
    "--save_precision",
    "bf16",
    "--training_comment",
    "walk LoRA",
    "--full_bf16",
    "--lr_scheduler",
    "cosine_with_min_lr",
    "--lr_scheduler_min_lr_ratio",
    "0.1",
    "--lr_decay_steps",
    "0",
    "--cuda_allow_tf32",
    "--cuda_cudnn_benchmark",
    "--ddp_timeout",
    "60",
    "--ddp_static_graph",
    "--ddp_gradient_as_bucket_view",
    "--split_attn",
    "--block_swap_ring_size",
    "4",
    "--block_swap_h2d_only",
    "--use_pinned_memory_for_block_swap",
    "--img_in_txt_in_offloading",
    "--disable_numpy_memmap",
    "--fp8_scaled",
    "--i2v_mode",
    "first",
    "--nabla_add_sta",
    "--no_vae_load",
    "--override_dit",
    "x.safetensors",
    "--huggingface_repo_id",
    "someone/walk-lora",
    "--huggingface_repo_visibility",
    "private",
    "--async_upload",
]
MUSUBI_CONFIG = """
[metadata]
metadata_title = "Walk"
metadata_author = "someone"
metadata_description = "a man walking"
metadata_license = "apache-2.0"
metadata_tags = "walk,video"
metadata_reso = "64,64"
metadata_arch = "Kandinsky-5/lora"
[saving]
save_every_n_steps = 1
save_last_n_steps = 2
save_last_n_steps_state = 1
save_state = true
[logging]
log_prefix = "k5_"
log_config = true
"""


def test_a_musubi_command_line_and_config_file_train_and_each_notice_is_printed_once(
    tiny_tree, cached_dataset, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the upload fails: a warning, the files stay
    _, _, video_only = cached_dataset
    config = tmp_path / "musubi.toml"
    config.write_text(MUSUBI_CONFIG)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="could not upload"):
        kandinsky5_train_network.main(
            train_args(
                tiny_tree, video_only, out, "--max_train_steps", "4", "--config_file", str(config), *MUSUBI_COMMAND
            )
        )
    notes = capsys.readouterr().err
    for option in TRAINING_NOTICES:
        assert notes.count(f"note: {option} changes nothing here") == 1, option
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        metadata = f.metadata()
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16  # --save_precision bf16
    assert metadata["modelspec.title"] == "Walk" and metadata["modelspec.license"] == "apache-2.0"
    assert metadata["modelspec.resolution"] == "64,64" and metadata["ss_training_comment"] == "walk LoRA"
    names = sorted(p.name for p in out.iterdir())
    # musubi's rotation, N counting steps: at step 4 the files of steps 2-4 (the save 3 steps back goes) and
    # the states of steps 3-4 (--save_last_n_steps_state 1: the state 2 steps back goes)
    assert names == [
        "lora-state",
        "lora-step00000002.safetensors",
        "lora-step00000003-state",
        "lora-step00000003.safetensors",
        "lora-step00000004-state",
        "lora-step00000004.safetensors",
        "lora.safetensors",
    ]


def test_generation_accepts_musubis_options_and_names_a_missing_last_frame(tiny_tree, tmp_path, capsys):
    generate(
        tiny_tree,
        "tiny-t2i",
        "--prompt",
        "a cat",
        "--steps",
        "1",
        "--output",
        str(tmp_path / "cat.png"),
        "--fp8_scaled",
        "--fp8_fast",
        "--disable_numpy_memmap",
    )
    notes = capsys.readouterr().err
    for option in GENERATION_NOTICES:
        assert notes.count(f"note: {option} changes nothing here") == 1
    with pytest.raises(SystemExit, match="--image_last: cannot read image last.png"):
        kandinsky5_generate_video.main(["--task", "tiny-i2v", "--image", str(tmp_path / "cat.png"), "--prompt", "x",
                                        "--image_last", "last.png"])  # fmt: skip


def test_weighting_schemes_follow_musubis_formulas():
    t = torch.tensor([0.25, 0.5, 0.75])
    assert torch.allclose(loss_weights("sigma_sqrt", t), t**-2)
    assert torch.allclose(loss_weights("cosmap", t), 2 / (math.pi * (1 - 2 * t + 2 * t**2)))
    assert torch.equal(loss_weights("none", t), torch.ones(3))
    prediction, x0, noise = torch.randn(3, 2, 4, 4, 16), torch.randn(3, 2, 4, 4, 16), torch.randn(3, 2, 4, 4, 16)
    per_sample = (prediction - (noise - x0)).square().flatten(1).mean(1)
    weighted = flow_matching_loss(prediction, x0, noise, sample_weight=loss_weights("sigma_sqrt", t))
    assert torch.allclose(weighted, (per_sample * t**-2).mean())


def test_sigma_sampling_with_the_mode_density_and_a_timestep_window():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(
        20000, "sigma", g, weighting_scheme="mode", mode_scale=1.29, min_timestep=100, max_timestep=900
    )
    assert t.min() >= 0.1 - 1e-6 and t.max() <= 0.9 + 1e-6
    # the mode density with a positive scale puts more draws in the middle than uniform sigma sampling does
    uniform = sample_timesteps(20000, "sigma", torch.Generator().manual_seed(0))
    middle = lambda x: ((x > 0.35) & (x < 0.65)).float().mean()  # noqa: E731
    assert middle(t) > middle(uniform[(uniform >= 0.1) & (uniform <= 0.9)]) + 0.05
    shifted = sample_timesteps(20000, "sigma", torch.Generator().manual_seed(0), discrete_flow_shift=3.0)
    assert shifted.mean() > uniform.mean() + 0.1


def test_resolution_shifts_logsnr_and_qinglong():
    assert resolution_shift("flux", 32, 32) == pytest.approx(math.exp(0.5))  # 256 tokens: mu = 0.5
    assert resolution_shift("flux", 128, 128) == pytest.approx(math.exp(1.15))  # 4096 tokens
    assert resolution_shift("qwen", 256, 128) == pytest.approx(math.exp(0.9))  # 8192 tokens
    small = sample_timesteps(8000, "flux_shift", torch.Generator().manual_seed(0), latent_hw=(32, 32))
    large = sample_timesteps(8000, "flux_shift", torch.Generator().manual_seed(0), latent_hw=(128, 128))
    assert large.mean() > small.mean() + 0.05  # more tokens: more noise
    logsnr = sample_timesteps(8000, "logsnr", torch.Generator().manual_seed(0), logit_mean=-2.0)
    assert logsnr.mean() > 0.6  # sigmoid(-L/2) with L around -2
    for mode in ("qinglong_flux", "qinglong_qwen", "qwen_shift"):
        t = sample_timesteps(4000, mode, torch.Generator().manual_seed(0), latent_hw=(64, 64))
        assert 0 <= t.min() and t.max() <= 1 and t.std() > 0.05


def test_buckets_stratify_and_preserve_distribution_shape_redraws():
    buckets = TimestepBuckets(10, seed=0)
    u = buckets.uniform(10)
    assert sorted((u * 10).long().tolist()) == list(range(10))  # each bucket once
    kept = sample_timesteps(
        4000,
        "sigmoid",
        torch.Generator().manual_seed(0),
        min_timestep=300,
        max_timestep=700,
        preserve_distribution_shape=True,
    )
    assert kept.min() >= 0.3 and kept.max() <= 0.7
    free = torch.sigmoid(torch.randn(200000, generator=torch.Generator().manual_seed(1)))
    inside = free[(free >= 0.3) & (free <= 0.7)]
    assert abs(kept.mean() - inside.mean()) < 0.01 and abs(kept.std() - inside.std()) < 0.01
    scaled = sample_timesteps(4000, "sigmoid", torch.Generator().manual_seed(0), min_timestep=300, max_timestep=700)
    assert abs(scaled.std() - inside.std()) > 0.01  # rescaling, the default, changes the shape


def fresh_state() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def test_base_weights_train_as_a_merged_checkpoint_does(tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset
    first = tmp_path / "first"
    kandinsky5_train_network.main(
        train_args(tiny_tree, video_only, first, "--max_train_steps", "2", "--learning_rate", "1e-2")
    )
    fresh_state()
    dit = tiny_tree / "model/tiny_t2v.safetensors"
    merged = tmp_path / "merged.safetensors"
    lora_tools(
        [
            "merge",
            "--dit",
            str(dit),
            "--lora",
            str(first / "lora.safetensors"),
            "--multiplier",
            "0.7",
            "--output",
            str(merged),
        ]
    )
    # in bf16 both round the merged weights to bf16 the same way (the merge command writes the DiT's dtype)
    common = ["--max_train_steps", "2", "--timestep_sampling", "uniform", "--mixed_precision", "bf16"]
    on_top = train_args(
        tiny_tree,
        video_only,
        tmp_path / "on_top",
        *common,
        "--base_weights",
        str(first / "lora.safetensors"),
        "--base_weights_multiplier",
        "0.7",
    )
    kandinsky5_train_network.main(on_top)
    fresh_state()
    on_merged = train_args(tiny_tree, video_only, tmp_path / "on_merged", *common)
    on_merged[on_merged.index("--dit") + 1] = str(merged)
    kandinsky5_train_network.main(on_merged)
    a, b = load_file(str(tmp_path / "on_top/lora.safetensors")), load_file(str(tmp_path / "on_merged/lora.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_scale_weight_norms_keeps_every_module_under_the_bound(tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset
    bound = 0.05
    out = tmp_path / "out"
    kandinsky5_train_network.main(
        train_args(
            tiny_tree,
            video_only,
            out,
            "--max_train_steps",
            "4",
            "--learning_rate",
            "5e-2",
            "--scale_weight_norms",
            str(bound),
        )
    )
    free = tmp_path / "free"
    kandinsky5_train_network.main(
        train_args(tiny_tree, video_only, free, "--max_train_steps", "4", "--learning_rate", "5e-2")
    )

    def norms(path):
        state = load_file(str(path))
        names = {k.rsplit(".", 2)[0] for k in state if k.endswith("lora_up.weight")}
        return [
            float(
                (state[f"{n}.lora_up.weight"] @ state[f"{n}.lora_down.weight"]).norm()
                * state[f"{n}.alpha"]
                / state[f"{n}.lora_down.weight"].shape[0]
            )
            for n in names
        ]

    assert max(norms(out / "lora.safetensors")) <= bound * (1 + 1e-4)
    assert max(norms(free / "lora.safetensors")) > bound  # without it the bound is passed


def test_dim_from_weights_full_bf16_and_a_scheduler_class(tiny_tree, cached_dataset, tmp_path, capsys):
    _, _, video_only = cached_dataset
    first = tmp_path / "first"
    kandinsky5_train_network.main(
        train_args(tiny_tree, video_only, first, "--max_train_steps", "1", "--network_dim", "4", "--network_alpha", "2")
    )
    out = tmp_path / "out"
    kandinsky5_train_network.main(
        train_args(
            tiny_tree,
            video_only,
            out,
            "--max_train_steps",
            "3",
            "--network_weights",
            str(first / "lora.safetensors"),
            "--dim_from_weights",
            "--full_bf16",
            "--lr_scheduler_type",
            "torch.optim.lr_scheduler.StepLR",
            "--lr_scheduler_args",
            "step_size=1",
            "gamma=0.5",
            "--logging_dir",
            str(tmp_path / "logs"),
        )
    )
    assert "--dim_from_weights: rank 4, alpha 2" in capsys.readouterr().out
    state = load_file(str(out / "lora.safetensors"))
    down = next(v for k, v in state.items() if k.endswith("lora_down.weight"))
    assert down.shape[0] == 4
    assert all(torch.equal(v, v.bfloat16().float()) for v in state.values())  # trained in bf16
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [EventAccumulator(str(p.parent)).Reload() for p in (tmp_path / "logs").rglob("events.out.tfevents.*")]
    rates = [e.value for acc in events if "lr" in acc.Tags()["scalars"] for e in acc.Scalars("lr")]
    assert rates == pytest.approx([1e-4 * 0.5, 1e-4 * 0.25, 1e-4 * 0.125])  # StepLR halves it each step
    with pytest.raises(SystemExit, match="is not a learning-rate scheduler"):
        kandinsky5_train_network.main(train_args(tiny_tree, video_only, out, "--lr_scheduler_type", "os.system"))


def test_show_timesteps_draws_the_picture_and_stops(tiny_tree, cached_dataset, tmp_path, capsys):
    _, _, video_only = cached_dataset
    out = tmp_path / "out"
    kandinsky5_train_network.main(
        train_args(tiny_tree, video_only, out, "--show_timesteps", "image", "--weighting_scheme", "sigma_sqrt",
                   "--logging_dir", str(tmp_path / "logs"))
    )  # fmt: skip
    assert (out / "timesteps.png").is_file() and not (out / "lora.safetensors").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [EventAccumulator(str(p.parent)).Reload() for p in (tmp_path / "logs").rglob("events.out.tfevents.*")]
    assert any("timesteps" in e.Tags()["images"] for e in events)  # and in the tracker
    kandinsky5_train_network.main(train_args(tiny_tree, video_only, out, "--show_timesteps", "console"))
    assert capsys.readouterr().out.count("weight") >= 50


def test_compile_options_follow_musubis_names():
    args = kandinsky5_train_network.parser().parse_args(
        ["--compile", "--compile_mode", "max-autotune", "--compile_dynamic", "false", "--compile_fullgraph"]
    )
    assert compile_options(args) == {"backend": "inductor", "mode": "max-autotune", "dynamic": False, "fullgraph": True}
    dynamo = kandinsky5_train_network.parser().parse_args(["--dynamo_backend", "EAGER", "--dynamo_dynamic"])
    assert compile_options(dynamo)["backend"] == "eager" and compile_options(dynamo)["dynamic"] is True
    assert compile_options(kandinsky5_train_network.parser().parse_args([])) is None


def test_log_prefix_log_config_and_tracker_config(tiny_tree, cached_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _, _, video_only = cached_dataset
    trackers = tmp_path / "trackers.toml"
    trackers.write_text('[wandb]\ntags = ["walk", "k5"]\nnotes = "first try"\n')
    logs = tmp_path / "logs"
    kandinsky5_train_network.main(
        train_args(tiny_tree, video_only, tmp_path / "out", "--max_train_steps", "1", "--log_with", "all",
                   "--logging_dir", str(logs), "--log_prefix", "k5_", "--log_config",
                   "--log_tracker_config", str(trackers))
    )  # fmt: skip
    assert (logs / "k5_network_train").is_dir()  # tensorboard's run folder, prefixed
    from .wandb_records import run_records

    records = list(run_records(next(logs.glob("wandb/offline-run-*/run-*.wandb"))))
    run = next(r.run for r in records if r.HasField("run"))
    assert list(run.tags) == ["walk", "k5"] and run.notes == "first try" and run.project == "k5_network_train"
    config = {item.key: item.value_json for r in records if r.HasField("config") for item in r.config.update}
    assert config["timestep_sampling"] == '"shift"' and config["max_train_steps"] == "1"


def test_resume_from_huggingface_takes_the_state_from_the_hub_cache(tiny_tree, cached_dataset, tmp_path):
    """The state is looked up through huggingface_hub (a pre-filled cache, offline), then resumed."""
    import os
    import shutil
    import subprocess
    import sys

    from .test_download import cache_repo
    from .training_helpers import ROOT

    _, _, video_only = cached_dataset
    first = tmp_path / "first"
    kandinsky5_train_network.main(
        train_args(tiny_tree, video_only, first, "--max_train_steps", "3", "--save_every_n_steps", "2", "--save_state")
    )
    state = first / "lora-step00000002-state"
    cache = tmp_path / "hub"
    cache_repo(cache, "someone/walk-lora", {f"states/{p.name}": p.read_bytes() for p in state.iterdir()})
    resumed = tmp_path / "resumed"
    command = [
        sys.executable,
        str(ROOT / "kandinsky5_train_network.py"),
        *train_args(tiny_tree, video_only, resumed, "--max_train_steps", "3"),
        "--resume",
        "someone/walk-lora/states",
        "--resume_from_huggingface",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2" in result.stdout
    a, b = load_file(str(first / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # continued exactly, as from the local folder
    shutil.rmtree(cache)


def test_sample_vae_dtype_and_dit_offload_leave_training_unchanged(tiny_tree, cached_dataset, tmp_path):
    from .training_helpers import sampling_args

    _, _, video_only = cached_dataset
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --f 5 --s 2\n")
    common = ["--max_train_steps", "2", "--sample_every_n_steps", "1", *sampling_args(tiny_tree, prompts)]
    kandinsky5_train_network.main(train_args(tiny_tree, video_only, tmp_path / "a", *common))
    options = ["--vae_dtype", "bfloat16", "--offload_dit_during_sampling"]
    kandinsky5_train_network.main(train_args(tiny_tree, video_only, tmp_path / "b", *common, *options))
    a, b = load_file(str(tmp_path / "a/lora.safetensors")), load_file(str(tmp_path / "b/lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b/sample/step00000002/000_42.mp4").is_file()
