import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import kandinsky5_cache_latents
import kandinsky5_cache_text_encoder_outputs
from dataset.cache_files import read_cache
from kandinsky5.inference.media import load_image

from .media_factory import (
    caption,
    write_gif,
    write_image,
    write_rotated_jpeg,
    write_transparent_png,
    write_video,
)


def build_media(root: Path) -> Path:
    images, videos = root / "images", root / "videos"
    images.mkdir(parents=True)
    videos.mkdir()
    for path in (
        write_image(images / "a.png", 70, 50),
        write_rotated_jpeg(images / "b.jpg", 64, 40),
        write_image(images / "c.webp", 48, 48, seed=2),
        write_transparent_png(images / "d.png", 32, 32),
    ):
        caption(path, f"caption of {path.name}")
    (images / "e.png").write_text("not an image")  # a text file renamed .png
    caption(images / "e.png", "broken")
    write_image(images / "f.png", 40, 40)  # no caption file
    for path in (
        write_video(videos / "v1.mp4", 20, 70, 54),
        write_video(videos / "v2.webm", 13, 64, 48, codec="libvpx-vp9"),
        write_video(videos / "v3.mkv", 9, 33, 21, codec="ffv1", pix_fmt="yuv444p"),
        write_gif(videos / "g.gif", 6, 40, 30),
        write_video(videos / "short.mp4", 3, 32, 32),
    ):
        caption(path, f"caption of {path.name}")
    full = write_video(root / "full.mp4", 12, 32, 32)
    (videos / "t.mp4").write_bytes(full.read_bytes()[: full.stat().st_size // 3])  # truncated
    caption(videos / "t.mp4", "truncated")
    frames = videos / "frames"
    frames.mkdir()
    for i in range(9):
        write_image(frames / f"{i:04d}.png", 32, 24, seed=i)
    caption(frames, "a folder of frames")
    config = root / "dataset.toml"
    config.write_text(f"""
[general]
resolution = [64, 64]
caption_extension = ".txt"
enable_bucket = true

[[datasets]]
image_directory = "{images}"
cache_directory = "{root / "cache_images"}"

[[datasets]]
video_directory = "{videos}"
cache_directory = "{root / "cache_videos"}"
target_frames = [5, 9]
""")
    return config


def run(module, tree, config, *extra):
    if module is kandinsky5_cache_latents:
        args = ["--vae", str(tree / "vae"), "--num_workers", "2"]
    else:
        args = ["--text_encoder_qwen", str(tree / "text_encoder"), "--text_encoder_clip", str(tree / "text_encoder2")]
    module.main(["--dataset_config", str(config), "--task", "tiny-t2v", *args, *extra])


@pytest.fixture(scope="module")
def cached(tiny_tree, tmp_path_factory):
    """The media tree after one run of each caching command (each exits 1: some items are bad)."""
    root = tmp_path_factory.mktemp("media")
    config = build_media(root)
    for module in (kandinsky5_cache_latents, kandinsky5_cache_text_encoder_outputs):
        with pytest.raises(SystemExit) as exit_info:
            run(module, tiny_tree, config)
        assert exit_info.value.code == 1
    return root, config


def files(folder: Path, suffix: str) -> list[str]:
    return sorted(p.name for p in folder.glob(f"*{suffix}"))


def by_stem(folder: Path, stem: str, suffix: str = "_k5tk.safetensors") -> list[Path]:
    return sorted(p for p in folder.glob(f"{stem}-*{suffix}") if not p.name.endswith("_te.safetensors"))


def test_latent_caches_of_every_good_item_with_shapes_and_metadata(cached):
    root, _ = cached
    images, videos = root / "cache_images", root / "cache_videos"
    assert [p.name.split("-")[0] for p in sorted(images.glob("*_k5tk.safetensors"))] == ["a", "b", "c", "d"]
    stems = ("v1", "v2", "v3", "g", "frames")
    clips = {stem: [p.name.split("_")[-3] for p in by_stem(videos, stem)] for stem in stems}
    both = ["00000-005", "00000-009"]
    assert clips == {"v1": both, "v2": both, "v3": both, "g": ["00000-005"], "frames": both}
    nine_frames = by_stem(videos, "v1")[1]
    assert nine_frames.name.endswith("_00000-009_0080x0048_k5tk.safetensors")  # 70x54 -> the 80x48 bucket
    tensors, meta = read_cache(nine_frames)
    assert tensors["latent"].shape == (3, 6, 10, 16) and tensors["first_frame"].shape == (1, 6, 10, 16)
    fingerprint = json.loads(meta["fingerprint"])
    assert fingerprint["clip"] == [0, 9] and fingerprint["bucket"] == [80, 48] and meta["kind"] == "latent"
    tensors, _ = read_cache(by_stem(images, "a")[0])
    assert set(tensors) == {"latent"} and tensors["latent"].shape[0] == 1
    assert not list(images.glob(".*")) and not list(videos.glob(".*"))  # no temporary files left behind


def test_exif_rotation_and_alpha_are_applied(cached):
    root, _ = cached
    (rotated,) = by_stem(root / "cache_images", "b")
    width, height = (int(x) for x in rotated.name.split("_")[-2].split("x"))
    assert height > width  # stored 64x40, displayed 40x64
    image = load_image(root / "images" / "d.png")
    assert image.mode == "RGB" and image.getpixel((5, 30)) == (255, 255, 255) and image.getpixel((5, 2)) == (200, 0, 0)


def test_text_caches_use_the_template_of_the_content(cached):
    root, _ = cached
    assert [n.split("-")[0] for n in files(root / "cache_images", "_k5tk_te.safetensors")] == ["a", "b", "c", "d", "e"]
    video_caches = [n.split("-")[0] for n in files(root / "cache_videos", "_k5tk_te.safetensors")]
    assert video_caches == ["frames", "g", "short", "t", "v1", "v2", "v3"]
    tensors, meta = read_cache(next((root / "cache_videos").glob("v1-*_te.safetensors")))
    assert meta["template"] == "video" and meta["caption"] == "caption of v1.mp4"
    assert tensors["text"].ndim == 2 and tensors["text"].shape[1] == 32 and tensors["pooled"].shape == (32,)
    _, meta = read_cache(next((root / "cache_images").glob("a-*_te.safetensors")))
    assert meta["template"] == "image" and json.loads(meta["fingerprint"])["max_length"] == 256


def test_bad_items_are_reported_and_the_exit_code_is_non_zero(tiny_tree, cached, capsys):
    root, config = cached
    with pytest.raises(SystemExit) as exit_info:
        run(kandinsky5_cache_latents, tiny_tree, config, "--skip_existing")
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "cached 0, already up to date 13, failed 4" in out
    for name, reason in (
        ("e.png", "cannot read image"),
        ("f.png", "no caption file f.txt"),
        ("t.mp4", "cannot decode"),
        ("short.mp4", "has 3 frames"),
    ):
        assert any(name in line and reason in line for line in out.splitlines()), name


def test_skip_existing_redoes_only_what_changed_and_stale_caches_go(tiny_tree, tmp_path):
    config = build_media(tmp_path)
    for module in (kandinsky5_cache_latents, kandinsky5_cache_text_encoder_outputs):
        with pytest.raises(SystemExit):
            run(module, tiny_tree, config)
    images = tmp_path / "cache_images"
    te = {p.name.split("-")[0]: p for p in images.glob("*_te.safetensors")}
    stamps = {k: p.stat().st_mtime_ns for k, p in te.items()}
    old_a, _ = read_cache(te["a"])
    caption(tmp_path / "images" / "a.png", "a new caption")
    (tmp_path / "images" / "c.webp").unlink()
    (tmp_path / "images" / "c.txt").unlink()
    with pytest.raises(SystemExit):
        run(kandinsky5_cache_text_encoder_outputs, tiny_tree, config, "--skip_existing")
    new_a, meta = read_cache(te["a"])
    assert (
        meta["caption"] == "a new caption"
        and not old_a["text"].shape == new_a["text"].shape
        or not (old_a["text"] == new_a["text"]).all()
    )
    assert te["b"].stat().st_mtime_ns == stamps["b"] and te["d"].stat().st_mtime_ns == stamps["d"]
    assert not te["c"].exists()  # its image is gone: stale cache deleted
    latent_c = by_stem(images, "c")
    assert latent_c  # latents of c are still there (only the text command ran)
    with pytest.raises(SystemExit):
        run(kandinsky5_cache_latents, tiny_tree, config, "--skip_existing", "--keep_cache")
    assert by_stem(images, "c") == latent_c  # --keep_cache keeps it
    write_image(tmp_path / "images" / "a.png", 90, 30, seed=9)  # the source changed: new size, new latent
    with pytest.raises(SystemExit):
        run(kandinsky5_cache_latents, tiny_tree, config, "--skip_existing")
    assert not by_stem(images, "c")
    (a_latent,) = by_stem(images, "a")
    width, height = (int(x) for x in a_latent.name.split("_")[-2].split("x"))
    assert width > 2 * height


def test_jsonl_sources_with_the_same_stem_never_share_a_cache_and_buckets_can_be_off(tiny_tree, tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        write_image(tmp_path / folder / "same.png", 50, 30)
    video = write_video(tmp_path / "x" / "clip.mp4", 9, 70, 54)
    (tmp_path / "images.jsonl").write_text(
        "\n".join(json.dumps({"image_path": f"{f}/same.png", "caption": f"from {f}"}) for f in ("x", "y")) + "\n\n"
    )
    (tmp_path / "videos.jsonl").write_text(json.dumps({"video_path": str(video), "caption": "c"}) + "\n")
    config = tmp_path / "d.toml"
    config.write_text(f"""
[[datasets]]
image_jsonl_file = "{tmp_path / "images.jsonl"}"
cache_directory = "{tmp_path / "ci"}"
resolution = 64
enable_bucket = true
[[datasets]]
video_jsonl_file = "{tmp_path / "videos.jsonl"}"
cache_directory = "{tmp_path / "cv"}"
resolution = [48, 32]
target_frames = [5]
""")
    for module in (kandinsky5_cache_latents, kandinsky5_cache_text_encoder_outputs):
        run(module, tiny_tree, config)  # all good: no SystemExit
    assert len(files(tmp_path / "ci", "_k5tk.safetensors")) == 2 and len(files(tmp_path / "ci", "_te.safetensors")) == 2
    (clip,) = files(tmp_path / "cv", "_k5tk.safetensors")
    assert "_0048x0032_" in clip  # enable_bucket is off for this dataset: the resolution itself, for videos too


def test_config_errors_stop_before_any_work(tiny_tree, tmp_path):
    (tmp_path / "d.toml").write_text('[[datasets]]\nimage_directory = "nowhere"\n')
    with pytest.raises(SystemExit, match="image_directory 'nowhere' does not exist"):
        run(kandinsky5_cache_latents, tiny_tree, tmp_path / "d.toml")
    assert os.listdir(tmp_path) == ["d.toml"]


def test_an_image_task_caches_with_the_flux_vae(tiny_tree, tmp_path):
    (tmp_path / "imgs").mkdir()
    caption(write_image(tmp_path / "imgs" / "p.png", 64, 48), "p")
    (tmp_path / "d.toml").write_text(f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\nresolution = 64\n')
    kandinsky5_cache_latents.main(
        ["--dataset_config", str(tmp_path / "d.toml"), "--task", "tiny-t2i", "--vae", str(tiny_tree / "flux/vae")]
    )
    (cache,) = (tmp_path / "imgs").glob("*_k5tk.safetensors")
    assert read_cache(cache)[1]["vae"] == "flux"
    with pytest.raises(SystemExit, match="needs the FLUX.1 image VAE"):
        kandinsky5_cache_latents.main(
            ["--dataset_config", str(tmp_path / "d.toml"), "--task", "tiny-t2i", "--vae", str(tiny_tree / "vae")]
        )
    assert Image.open(tmp_path / "imgs" / "p.png").size == (64, 48)


def test_a_cache_folder_shared_with_musubi_tuner_keeps_its_files_and_names_them(tiny_tree, tmp_path):
    """musubi-tuner's Kandinsky 5 caches (*_k5.safetensors, *_k5_te.safetensors, another layout) in the
    same folder: caching neither reads nor deletes them; training on them alone names one."""
    from safetensors.torch import save_file

    import kandinsky5_train_network

    (tmp_path / "imgs").mkdir()
    caption(write_image(tmp_path / "imgs" / "p.png", 64, 48), "a pear")
    musubi = {
        tmp_path / "imgs" / "p_0064x0048_k5.safetensors": {"latents_1x8x8_bfloat16": torch.zeros(16, 1, 6, 8)},
        tmp_path / "imgs" / "p_k5_te.safetensors": {"varlen_qwen_text_bfloat16": torch.zeros(3, 32)},
    }
    for path, tensors in musubi.items():
        save_file(tensors, str(path), metadata={"architecture": "k5"})
    config = tmp_path / "d.toml"
    config.write_text(f'[[datasets]]\nimage_directory = "{tmp_path / "imgs"}"\nresolution = 64\n')
    train = ["--task", "tiny-t2v", "--dit", str(tiny_tree / "model/tiny_t2v.safetensors")]
    train += ["--dataset_config", str(config), "--output_dir", str(tmp_path / "out"), "--mixed_precision", "no"]
    with pytest.raises(SystemExit, match=r"2 cache files of another tool, such as .*p_0064x0048_k5.safetensors"):
        kandinsky5_train_network.main(train)
    for module in (kandinsky5_cache_latents, kandinsky5_cache_text_encoder_outputs):
        run(module, tiny_tree, config)
    run(kandinsky5_cache_latents, tiny_tree, config)  # a second run: its stale-cache cleanup leaves them alone
    assert all(path.exists() for path in musubi)
    assert len(files(tmp_path / "imgs", "_k5tk.safetensors")) == 1
    kandinsky5_train_network.main([*train, "--max_train_steps", "1", "--max_data_loader_n_workers", "0"])
    assert (tmp_path / "out" / "lora.safetensors").exists()


def test_a_jsonl_line_with_a_non_text_path_fails_alone(tiny_tree, tmp_path, capsys):
    image = write_image(tmp_path / "good.png", 64, 48)
    lines = [{"image_path": 5, "caption": "a number"}, {"image_path": str(image), "caption": "a good one"}]
    (tmp_path / "images.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    config = tmp_path / "d.toml"
    config.write_text(
        f'[[datasets]]\nimage_jsonl_file = "{tmp_path / "images.jsonl"}"\ncache_directory = "{tmp_path / "c"}"\n'
    )
    with pytest.raises(SystemExit) as stop:
        run(kandinsky5_cache_latents, tiny_tree, config)
    assert stop.value.code == 1
    out = capsys.readouterr().out
    assert "cached 1, already up to date 0, failed 1" in out
    assert "images.jsonl:1" in out and "'image_path' must be a path (text), got 5" in out
    assert len(files(tmp_path / "c", "_k5tk.safetensors")) == 1


def test_an_error_caused_by_the_default_task_says_the_task_was_not_given(tiny_tree, tmp_path):
    """musubi-tuner's caching commands give no --task: the default task's Qwen width is then the cause."""
    (tmp_path / "images").mkdir()
    caption(write_image(tmp_path / "images" / "a.png", 64, 64), "a cat")
    config = tmp_path / "data.toml"
    config.write_text(f'[[datasets]]\nimage_directory = "{tmp_path / "images"}"\nresolution = 64\n')
    encoders = [
        "--text_encoder_qwen",
        str(tiny_tree / "text_encoder"),
        "--text_encoder_clip",
        str(tiny_tree / "text_encoder2"),
    ]
    with pytest.raises(SystemExit) as stopped:
        kandinsky5_cache_text_encoder_outputs.main(["--dataset_config", str(config), *encoders])
    message = str(stopped.value.code)
    assert "has hidden size 32" in message
    assert message.endswith("(--task was not given, so the default task k5-pro-t2v-5s-sd applied)")
    with pytest.raises(SystemExit) as stopped:  # with --task the same mistake says nothing of a default
        kandinsky5_cache_text_encoder_outputs.main(
            ["--dataset_config", str(config), "--task", "k5-lite-t2v-5s-sd", *encoders]
        )
    assert "has hidden size 32" in str(stopped.value.code) and "not given" not in str(stopped.value.code)


def test_a_second_config_on_the_same_cache_folder_neither_deletes_nor_mixes_the_first_ones_caches(
    tiny_tree, tmp_path, capsys
):
    """#33: trying other target_frames on the same cache_directory deleted the main config's clips, and
    training read every cache of the folder."""
    from dataset.config import load_dataset_config
    from dataset.training_data import find_samples

    (tmp_path / "videos").mkdir()
    for i in range(2):
        caption(write_video(tmp_path / "videos" / f"walk_{i}.mp4", 9, 64, 64, seed=i), f"walk {i}")
    configs = {}
    for name, frames in (("main", 9), ("trial", 5)):
        configs[name] = tmp_path / f"{name}.toml"
        configs[name].write_text(
            f'[[datasets]]\nvideo_directory = "{tmp_path / "videos"}"\ncache_directory = "{tmp_path / "cache"}"\n'
            f"resolution = 64\ntarget_frames = [{frames}]\n"
        )

    def samples(config):
        (entry,) = [find_samples(d) for d in load_dataset_config(config)]
        return sorted(s.latent_file.name for s in entry.samples)

    def cache_both(config):
        for module in (kandinsky5_cache_latents, kandinsky5_cache_text_encoder_outputs):
            run(module, tiny_tree, config)

    cache_both(configs["main"])
    main_files = samples(configs["main"])
    assert len(main_files) == 2 and all("-009_" in name for name in main_files)
    capsys.readouterr()
    cache_both(configs["trial"])
    out = capsys.readouterr()
    assert "stale caches deleted 0" in out.out and "2 caches of other dataset configs" in out.out + out.err
    assert samples(configs["main"]) == main_files  # kept, and each config reads its own
    assert len(samples(configs["trial"])) == 2 and all("-005_" in name for name in samples(configs["trial"]))

    (tmp_path / "videos" / "walk_1.mp4").unlink()  # the main config loses an item: only its own caches go
    cache_both(configs["main"])
    assert samples(configs["main"]) == main_files[:1]
    assert len(samples(configs["trial"])) == 2
