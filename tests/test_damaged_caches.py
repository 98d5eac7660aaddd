"""Damaged cache files (cut short, empty) are named before training starts with the command that
rebuilds them; that command redoes exactly those files; training then runs. Also: leaving their items
out on request, validation caches, and a cache that becomes unreadable while training runs."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import kandinsky5_cache_latents
import kandinsky5_cache_text_encoder_outputs
import kandinsky5_train_network
from dataset.cache_files import LATENT_SUFFIX, TEXT_SUFFIX, cache_damage

from .training_helpers import running_until, train_args


def copied_dataset(cached_dataset, root: Path) -> Path:
    """The session's cached dataset with its own copy of the cache folders (damaged here, not there)."""
    source_root, config, _ = cached_dataset
    for folder in ("cache_video", "cache_images"):
        shutil.copytree(source_root / folder, root / folder)
    text = config.read_text().replace(str(source_root / "cache_"), str(root / "cache_"))
    (root / "data.toml").write_text(text)
    return root / "data.toml"


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def cache_files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted(root.glob("cache_*/*.safetensors"))}


def encoder_args(tiny_tree: Path) -> list[str]:
    return [
        "--text_encoder_qwen",
        str(tiny_tree / "text_encoder"),
        "--text_encoder_clip",
        str(tiny_tree / "text_encoder2"),
    ]


def test_damaged_caches_are_named_with_the_rebuild_command_which_redoes_exactly_them(
    tiny_tree, cached_dataset, tmp_path
):
    config = copied_dataset(cached_dataset, tmp_path)
    clip_latent = next((tmp_path / "cache_video").glob(f"clip-*{LATENT_SUFFIX}"))
    clip_text = next((tmp_path / "cache_video").glob(f"clip-*{TEXT_SUFFIX}"))
    one_latent = next((tmp_path / "cache_images").glob(f"one-*{LATENT_SUFFIX}"))
    two_text = next((tmp_path / "cache_images").glob(f"two-*{TEXT_SUFFIX}"))
    cut_short(clip_latent), empty(one_latent), cut_short(two_text), empty(clip_text)
    damaged = {clip_latent, one_latent, two_text, clip_text}
    before = cache_files(tmp_path)

    with pytest.raises(SystemExit) as stopped:
        kandinsky5_train_network.main(train_args(tiny_tree, config, tmp_path / "out", "--max_train_steps", "2"))
    message = str(stopped.value.code)
    assert message.startswith(f"error: 4 cache file(s) of --dataset_config {config} are damaged:")
    for path in damaged:
        assert f"  {path}: " in message
    assert f"{clip_latent}: cut short or damaged (Error while deserializing header" in message
    assert f"{one_latent}: the file is empty" in message
    latents_command = f"python kandinsky5_cache_latents.py --dataset_config {config} --skip_existing"
    texts_command = f"python kandinsky5_cache_text_encoder_outputs.py --dataset_config {config} --skip_existing"
    assert latents_command in message and texts_command in message
    assert "--skip_damaged_caches" in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing started

    # the two commands as the message gives them, with the options the caches were made with
    kandinsky5_cache_latents.main([*latents_command.split()[2:], "--task", "tiny-t2v", "--vae", str(tiny_tree / "vae")])
    kandinsky5_cache_text_encoder_outputs.main(
        [*texts_command.split()[2:], "--task", "tiny-t2v", *encoder_args(tiny_tree)]
    )
    after = cache_files(tmp_path)
    assert set(after) == set(before)
    rebuilt = {path for path in after if after[path] != before[path]}
    assert rebuilt == damaged  # exactly the damaged files were written again
    assert all(cache_damage(path, ("latent",) if path.name.endswith(LATENT_SUFFIX) else ("text", "pooled")) is None
               for path in damaged)  # fmt: skip

    kandinsky5_train_network.main(train_args(tiny_tree, config, tmp_path / "out", "--max_train_steps", "2"))
    assert (tmp_path / "out" / "lora.safetensors").exists()


def test_skip_damaged_caches_leaves_their_items_out_and_says_which(tiny_tree, cached_dataset, tmp_path, capsys):
    config = copied_dataset(cached_dataset, tmp_path)
    one_text = next((tmp_path / "cache_images").glob(f"one-*{TEXT_SUFFIX}"))
    cut_short(one_text)
    args = train_args(tiny_tree, config, tmp_path / "out", "--max_train_steps", "2", "--skip_damaged_caches")
    kandinsky5_train_network.main(args)
    out = capsys.readouterr().out
    assert f"--skip_damaged_caches: 1 damaged cache file(s) of --dataset_config {config}; items left out:" in out
    assert f"  {one_text}: cut short or damaged" in out
    assert (tmp_path / "out" / "lora.safetensors").exists()


def test_a_damaged_validation_cache_is_named_before_training(tiny_tree, cached_dataset, tmp_path):
    config = copied_dataset(cached_dataset, tmp_path)
    clip_latent = next((tmp_path / "cache_video").glob(f"clip-*{LATENT_SUFFIX}"))
    empty(clip_latent)
    _, _, video_only = cached_dataset  # training on the session's undamaged clip
    extra = ["--validation_dataset_config", str(config), "--validate_every_n_steps", "1"]
    with pytest.raises(SystemExit, match=rf"1 cache file\(s\) of --validation_dataset_config {config} are damaged"):
        kandinsky5_train_network.main(train_args(tiny_tree, video_only, tmp_path / "out", *extra))


def test_a_cache_damaged_while_training_runs_is_named(tiny_tree, cached_dataset, tmp_path):
    config = copied_dataset(cached_dataset, tmp_path)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "kandinsky5_train_network.py",
        *train_args(tiny_tree, config, out, "--max_train_steps", "100000", "--save_every_n_steps", "1"),
    ]
    process = running_until(command, out / "lora-step00000001.safetensors")
    two_text = next((tmp_path / "cache_images").glob(f"two-*{TEXT_SUFFIX}"))
    cut_short(two_text)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 1
    last = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert f"of --dataset_config {config} became unreadable during training" in stderr
    assert f"  {two_text}: cut short or damaged" in stderr
    assert last[-1].strip().startswith("python kandinsky5_cache_text_encoder_outputs.py --dataset_config")
    assert (out / "lora-step00000001.safetensors").exists()  # what was saved is kept
