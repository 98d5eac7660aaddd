"""Hostile input: crafted files, bad numbers, bad output locations and interruptions at exact moments.

Each case names what a user (or an attacker) does and what must hold: a clear error that names the
option, file or value before any work, nothing written outside the output folder, no code run from a
file, and nothing finished lost."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kandinsky5_generate_video
import kandinsky5_train_network
from kandinsky5.training import training_state
from networks.lora_kandinsky import LoRANetwork

from .generation_helpers import generate
from .training_helpers import ROOT, train_args


class RunsCode:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def train(tiny_tree, config, out, *extra):
    kandinsky5_train_network.main(train_args(tiny_tree, config, out, *extra))


@pytest.fixture(scope="module")
def state_folder(tiny_tree, cached_dataset, tmp_path_factory):
    """A real state folder after 1 step, copied fresh for each test that damages it."""
    _, _, video_only = cached_dataset
    out = tmp_path_factory.mktemp("state")
    train(tiny_tree, video_only, out, "--max_train_steps", "1", "--save_state_on_train_end")
    return out / "lora-state"


def damaged_copy(state_folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "state"
    shutil.copytree(state_folder, copy)
    return copy


# --- security ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_a_crafted_state_file_runs_no_code_on_resume(tiny_tree, cached_dataset, state_folder, tmp_path, name):
    _, _, video_only = cached_dataset
    state, marker = damaged_copy(state_folder, tmp_path), tmp_path / "pwned"
    (state / name).write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(SystemExit, match=f"--resume {state}: {name} cannot be loaded"):
        train(tiny_tree, video_only, tmp_path / "out", "--max_train_steps", "2", "--resume", str(state))
    assert not marker.exists()


def test_no_torch_load_without_weights_only_outside_benchmarks():
    offenders = []
    for path in [*ROOT.glob("*.py"), *ROOT.glob("kandinsky5/**/*.py"), *ROOT.glob("modules/*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.name}:{number}")
    assert not offenders


@pytest.mark.parametrize("name", ["../../escaped", "sub/lora", "..", ""])
def test_output_name_must_be_a_plain_file_name(tiny_tree, cached_dataset, tmp_path, name):
    _, _, video_only = cached_dataset
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(SystemExit, match="--output_name .* must be a plain file name"):
        train(tiny_tree, video_only, out, "--max_train_steps", "1", "--output_name", name)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []


@pytest.mark.parametrize("via_config", [False, True])
def test_optimizer_type_calls_only_optimizer_classes(tiny_tree, cached_dataset, tmp_path, via_config):
    _, _, video_only = cached_dataset
    marker = tmp_path / "pwned"
    extra = ["--optimizer_type", "os.system", "--optimizer_args", f"command='touch {marker}'"]
    if via_config:
        config = tmp_path / "shared.toml"
        config.write_text(f'optimizer_type = "os.system"\noptimizer_args = ["command=\'touch {marker}\'"]\n')
        extra = ["--config_file", str(config)]
    with pytest.raises(SystemExit, match="'os.system' is not an optimizer: expected a torch.optim.Optimizer subclass"):
        train(tiny_tree, video_only, tmp_path / "out", "--max_train_steps", "1", *extra)
    assert not marker.exists()


def test_rotation_deletes_only_what_this_run_wrote(tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset
    out = tmp_path / "out"
    train(tiny_tree, video_only, out, "--max_train_steps", "2", "--save_every_n_steps", "1", "--save_state")
    resumed = ["--save_every_n_steps", "1", "--save_last_n_steps", "1", "--max_train_steps", "5"]
    train(tiny_tree, video_only, out, *resumed, "--resume", str(out / "lora-step00000002-state"))
    names = sorted(p.name for p in out.glob("*.safetensors"))
    # the saves of the last step are kept (musubi's meaning: at step 5, step 3 goes): steps 1 and 2 are
    # the first run's and stay; step 3 was this run's and is rotated out
    assert names == [
        "lora-step00000001.safetensors",
        "lora-step00000002.safetensors",
        "lora-step00000004.safetensors",
        "lora-step00000005.safetensors",
        "lora.safetensors",
    ]
    assert (out / "lora-step00000002-state").is_dir()


# --- nothing finished is lost ------------------------------------------------------------------------------


def test_ctrl_c_while_the_final_lora_is_saved_keeps_the_finished_run(tiny_tree, cached_dataset, tmp_path, monkeypatch):
    """SIGINT arrives at the exact moment the final LoRA starts being written."""
    _, _, video_only = cached_dataset
    save = LoRANetwork.save

    def interrupted_save(self, path, metadata, *args):
        if Path(path).name == "lora.safetensors":
            os.kill(os.getpid(), signal.SIGINT)
        return save(self, path, metadata, *args)

    monkeypatch.setattr(LoRANetwork, "save", interrupted_save)
    out = tmp_path / "out"
    train(tiny_tree, video_only, out, "--max_train_steps", "2")
    assert load_file(str(out / "lora.safetensors"))


def test_a_kill_while_a_state_is_replaced_leaves_one_to_resume_from(
    tiny_tree, cached_dataset, state_folder, tmp_path, monkeypatch
):
    """The new state is complete; the process dies after the old one was moved aside, before the new
    one is renamed in (the second rename): --resume with the folder's name still works."""
    _, _, video_only = cached_dataset
    state = damaged_copy(state_folder, tmp_path)
    replace = os.replace

    def dies_before_the_rename_in(source, target):
        if Path(target) == state:
            raise KeyboardInterrupt  # stands for the kill: nothing after this line runs
        return replace(source, target)

    monkeypatch.setattr(os, "replace", dies_before_the_rename_in)
    with pytest.raises(KeyboardInterrupt):
        training_state.save_state(state, _tiny_network(tiny_tree), {}, *_optimizer_and_schedule(), _position())
    monkeypatch.undo()
    assert not state.exists() and training_state.aside(state).is_dir()
    train(tiny_tree, video_only, tmp_path / "out", "--max_train_steps", "2", "--resume", str(state))
    assert (tmp_path / "out" / "lora.safetensors").exists()


def _tiny_network(tiny_tree):
    from kandinsky5.model.checkpoint import load_dit
    from kandinsky5.model.tasks import get_task
    from networks.lora_kandinsky import create_network

    dit = load_dit(tiny_tree / "model/tiny_t2v.safetensors", get_task("tiny-t2v"), dtype=torch.float32)
    return create_network(dit, 16, None, 0.0, None)


def _optimizer_and_schedule():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _position():
    return training_state.Position(1, 2, 0, "x")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: (s / "optimizer.pt").unlink(), "optimizer.pt cannot be loaded"),
        (lambda s: (s / "optimizer.pt").write_bytes((s / "optimizer.pt").read_bytes()[:100]), "optimizer.pt cannot"),
        (lambda s: (s / "rng.pt").write_bytes(b""), "rng.pt cannot be loaded"),
        (lambda s: (s / "train_state.json").write_text('{"step": 1}'), "train_state.json lacks 'epoch'"),
        (lambda s: (s / "train_state.json").write_text("{not json"), "train_state.json cannot be read"),
    ],
)
def test_a_damaged_state_folder_is_named(tiny_tree, cached_dataset, state_folder, tmp_path, damage, message):
    _, _, video_only = cached_dataset
    state = damaged_copy(state_folder, tmp_path)
    damage(state)
    with pytest.raises(SystemExit, match=f"--resume {state}: {message}"):
        train(tiny_tree, video_only, tmp_path / "out", "--max_train_steps", "2", "--resume", str(state))


def test_leftovers_of_killed_saves_are_removed_by_the_next_run(tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lora.k5tmp-abcd1234.safetensors").write_bytes(b"half a file")
    (out / ".lora-state.k5tmp-abcd1234").mkdir()
    (out / "notes.txt").write_text("the user's own file")
    train(tiny_tree, video_only, out, "--max_train_steps", "1")
    assert sorted(p.name for p in out.iterdir()) == ["lora.safetensors", "notes.txt"]


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_a_bad_output_dir_is_found_before_the_model_loads(tiny_tree, cached_dataset, tmp_path, kind):
    _, _, video_only = cached_dataset
    if kind == "file":
        out = tmp_path / "out"
        out.write_text("x")
        message = "--output_dir .*out is a file, not a folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o500)
        out, message = tmp_path / "ro" / "out", "is not writable"
    args = train_args(tiny_tree, video_only, out, "--max_train_steps", "1")
    args[args.index("--dit") + 1] = str(tmp_path / "no_such_dit.safetensors")  # loading it would fail otherwise
    with pytest.raises(SystemExit, match=message):
        kandinsky5_train_network.main(args)


# --- numbers -----------------------------------------------------------------------------------------------

TRAIN_NUMBERS = [
    ("--max_grad_norm", "-1", "a number >= 0"),
    ("--max_train_steps", "0", "an integer >= 1"),
    ("--max_train_steps", "-1", "an integer >= 1"),
    ("--save_every_n_steps", "-1", "an integer >= 1"),
    ("--max_train_epochs", "0", "an integer >= 1"),
    ("--blocks_to_swap", "-1", "an integer >= 0"),
    ("--network_dim", "0", "an integer >= 1"),
    ("--network_dim", "-4", "an integer >= 1"),
    ("--gradient_accumulation_steps", "0", "an integer >= 1"),
    ("--learning_rate", "nan", "not finite"),
    ("--network_dropout", "1", "a number in \\[0, 1\\)"),
]


@pytest.mark.parametrize("option, value, expected", TRAIN_NUMBERS)
def test_training_numbers_out_of_range_name_option_value_and_range(tmp_path, capsys, option, value, expected):
    with pytest.raises(SystemExit) as stop:
        kandinsky5_train_network.main(
            ["--dit", "x", "--dataset_config", "x", "--output_dir", str(tmp_path), option, value]
        )
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {option}: '{value}'" in error and re.search(expected, error), error


def test_config_file_numbers_are_checked_like_the_command_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('dit = "x"\ndataset_config = "x"\noutput_dir = "o"\nnetwork_dim = 0\n')
    with pytest.raises(
        SystemExit, match=r"--config_file .*c.toml: --network_dim: 0 is out of range: expected an integer >= 1"
    ):
        kandinsky5_train_network.main(["--config_file", str(config)])
    config.write_text('dit = "x"\ndataset_config = "x"\noutput_dir = "o"\nmax_train_steps = true\n')
    with pytest.raises(SystemExit, match="--max_train_steps: True is not an integer"):
        kandinsky5_train_network.main(["--config_file", str(config)])


GENERATION_NUMBERS = [
    ("--steps", "0"),
    ("--steps", "-3"),
    ("--frames", "0"),
    ("--width", "0"),
    ("--scheduler_scale", "0"),
    ("--guidance", "nan"),
    ("--lora_multiplier", "nan"),
    ("--fps", "-5"),
]


@pytest.mark.parametrize("option, value", GENERATION_NUMBERS)
def test_generation_numbers_are_refused_not_replaced_by_defaults(capsys, option, value):
    with pytest.raises(SystemExit) as stop:
        kandinsky5_generate_video.main(["--task", "tiny-t2v", "--prompt", "x", option, value])
    assert stop.value.code == 2
    assert f"argument {option}: '{value}'" in capsys.readouterr().err


def test_a_lora_file_holding_nan_is_named_before_sampling(tiny_tree, tmp_path):
    lora = tmp_path / "nan.safetensors"
    name = "lora_unet_visual_transformer_blocks_0_feed_forward_in_layer"
    save_file(
        {f"{name}.lora_down.weight": torch.full((4, 64), float("nan")), f"{name}.lora_up.weight": torch.zeros(128, 4)},
        str(lora),
    )
    with pytest.raises(SystemExit, match=f"LoRA {lora}: tensor .* holds NaN or infinite values"):
        generate(
            tiny_tree, "tiny-t2v", "--prompt", "x", "--lora_weight", str(lora), "--output", str(tmp_path / "a.mp4")
        )
    assert not (tmp_path / "a.mp4").exists()


def test_the_script_prints_one_line_for_a_bad_number():
    result = subprocess.run(
        [sys.executable, "kandinsky5_generate_video.py", "--task", "tiny-t2v", "--steps", "0", "--prompt", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("argument --steps: '0' is out of range: expected an integer in [1, 1000]")
    )


# --- media read rightly, or named ----------------------------------------------------------------------------


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from kandinsky5.inference.media import load_image

    ramp = np.linspace(0, 1, 64 * 48).reshape(48, 64)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tiff")
    for name in ("deep.png", "float.tiff"):
        pixels = np.asarray(load_image(tmp_path / name)).astype(float)[..., 0]
        assert abs(pixels.mean() - 127.5) < 2 and pixels.min() == 0 and pixels.max() == 255, name


def test_an_audio_only_file_says_it_has_no_video_stream(tmp_path):
    import av
    import numpy as np

    from dataset.frames import VideoReadError, read_frames

    path = tmp_path / "sound.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(VideoReadError, match="sound.mp4 has no video stream"):
        read_frames(path)


def test_a_vae_giving_nan_fails_its_items_instead_of_caching_zeros(tiny_tree, tmp_path, capsys):
    import kandinsky5_cache_latents

    from .media_factory import caption, write_image

    vae = tmp_path / "vae"
    shutil.copytree(tiny_tree / "vae", vae)
    weights = load_file(str(vae / "diffusion_pytorch_model.safetensors"))
    key = next(k for k in weights if k.startswith("encoder.") and k.endswith("weight") and weights[k].ndim > 1)
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, str(vae / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "images").mkdir()
    caption(write_image(tmp_path / "images" / "a.png", 64, 48), "a")
    config = tmp_path / "d.toml"
    config.write_text(f'[[datasets]]\nimage_directory = "{tmp_path / "images"}"\nresolution = 64\n')
    with pytest.raises(SystemExit) as stop:
        kandinsky5_cache_latents.main(["--dataset_config", str(config), "--task", "tiny-t2v", "--vae", str(vae)])
    assert stop.value.code == 1
    out = capsys.readouterr().out
    assert "a.png" in out and "the VAE gave NaN or infinite latents" in out
    assert not list((tmp_path / "images").glob("*_k5tk.safetensors"))


def test_a_caption_beyond_the_text_limit_is_warned_about(tiny_tree, tmp_path, capsys):
    import kandinsky5_cache_text_encoder_outputs

    from .media_factory import caption, write_image

    (tmp_path / "images").mkdir()
    caption(write_image(tmp_path / "images" / "long.png", 64, 48), " ".join(["a red fox"] * 400))
    caption(write_image(tmp_path / "images" / "short.png", 64, 48), "a red fox")
    config = tmp_path / "d.toml"
    config.write_text(f'[[datasets]]\nimage_directory = "{tmp_path / "images"}"\nresolution = 64\n')
    kandinsky5_cache_text_encoder_outputs.main(
        ["--dataset_config", str(config), "--task", "tiny-t2v", "--text_encoder_qwen", str(tiny_tree / "text_encoder")]
        + ["--text_encoder_clip", str(tiny_tree / "text_encoder2")]
    )
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "long.png" in warnings[0] and "limit of 256 tokens: 256 kept" in warnings[0]


# --- disk full -----------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """Makes a tmpfs of the given size (root only: mounting needs it), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mounted = []

    def make(size: str) -> Path:
        folder = tmp_path / f"small{len(mounted)}"
        folder.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]).returncode:
            pytest.skip("this machine does not allow mounting a tmpfs")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_disk_full_while_caching_fails_items_keeps_the_rest_and_says_so(tiny_tree, tmp_path, small_disk, capsys):
    import kandinsky5_cache_latents
    from dataset.cache_files import read_cache

    from .media_factory import caption, write_image

    disk = small_disk("64k")  # room for about a dozen of the 30 latents
    (tmp_path / "images").mkdir()
    for i in range(30):
        caption(write_image(tmp_path / "images" / f"{i:02d}.png", 64, 48, seed=i), f"picture {i}")
    config = tmp_path / "d.toml"
    config.write_text(
        f'[[datasets]]\nimage_directory = "{tmp_path / "images"}"\ncache_directory = "{disk}"\nresolution = 64\n'
    )
    with pytest.raises(SystemExit) as stop:
        kandinsky5_cache_latents.main(
            ["--dataset_config", str(config), "--task", "tiny-t2v", "--vae", str(tiny_tree / "vae")]
        )
    assert stop.value.code == 1
    out = capsys.readouterr().out
    written = sorted(disk.glob("*_k5tk.safetensors"))
    assert 0 < len(written) < 30
    assert f"cached {len(written)}, already up to date 0, failed {30 - len(written)}" in out
    assert "No space left on device" in out
    assert all(read_cache(path)[0]["latent"].shape[-1] == 16 for path in written)  # whole files only
    assert not list(disk.glob(".*"))  # no temporary file left behind


@pytest.mark.parametrize("states", [False, True])
def test_disk_full_while_training_stops_clearly_with_the_saved_files_intact(
    tiny_tree, cached_dataset, small_disk, states
):
    _, _, video_only = cached_dataset
    disk = small_disk("512k")  # room for a few LoRA files of rank 4 (or fewer with their states)
    saves = ["--max_train_steps", "50", "--save_every_n_steps", "1", "--network_dim", "4"]
    with pytest.raises(SystemExit, match=f"cannot write {disk}/lora-step000000\\d\\d[.-].*No space left"):
        train(tiny_tree, video_only, disk, *saves, *(["--save_state"] if states else []))
    saved = sorted(disk.glob("lora-step*.safetensors"))
    assert saved and all(load_file(str(path)) for path in saved)
    assert not list(disk.glob(".*"))


# --- weights and options that name no file ----------------------------------------------------------------------


def test_a_qwen_folder_without_or_with_truncated_weights_is_named(tiny_tree, tmp_path):
    from kandinsky5.encoders.text_encoders import QwenEncoder, TextEncoderError

    folder = tmp_path / "qwen"
    shutil.copytree(tiny_tree / "text_encoder", folder)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").unlink()
    with pytest.raises(TextEncoderError, match=f"{folder} holds no weights"):
        QwenEncoder(folder)
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    with pytest.raises(TextEncoderError, match=f"the weights in {folder} cannot be read"):
        QwenEncoder(folder)


def test_a_dit_given_as_the_vae_is_named(tiny_tree):
    from kandinsky5.encoders.vae import VAEError, load_vae

    dit = tiny_tree / "model" / "tiny_t2v.safetensors"
    with pytest.raises(VAEError, match=f"VAE {dit}: a Kandinsky 5 DiT checkpoint, not a VAE"):
        load_vae(dit, "hunyuan")


def test_a_bad_regular_expression_in_network_args_is_named(tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset
    with pytest.raises(SystemExit, match=r"--network_args include_patterns: '\(unclosed' is not a regular expression"):
        train(
            tiny_tree,
            video_only,
            tmp_path,
            "--max_train_steps",
            "1",
            "--network_args",
            "include_patterns=['(unclosed']",
        )


def test_caching_removes_leftovers_of_killed_writes(tiny_tree, tmp_path):
    import kandinsky5_cache_latents

    from .media_factory import caption, write_image

    (tmp_path / "images").mkdir()
    caption(write_image(tmp_path / "images" / "a.png", 64, 48), "a")
    (tmp_path / "images" / ".a-1234_0064x0048_k5tk.k5tmp-abcd1234.safetensors").write_bytes(b"half")
    config = tmp_path / "d.toml"
    config.write_text(f'[[datasets]]\nimage_directory = "{tmp_path / "images"}"\nresolution = 64\n')
    kandinsky5_cache_latents.main(
        ["--dataset_config", str(config), "--task", "tiny-t2v", "--vae", str(tiny_tree / "vae")]
    )
    assert not list((tmp_path / "images").glob(".*"))
