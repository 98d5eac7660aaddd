import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import kandinsky5_generate_video
from kandinsky5.encoders.vae import load_vae
from kandinsky5.inference.media import image_to_pixels, load_image, pixels_to_frames, read_metadata, resize_and_crop

from .generation_helpers import generate

ROOT = Path(__file__).resolve().parents[1]


def video_info(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        return len(frames), stream.width, stream.height, float(stream.average_rate), frames


def latent(path):
    return load_file(str(path))["latent"]


def test_t2v_writes_an_mp4_with_the_requested_frames_size_and_fps(tiny_tree, tmp_path):
    out = tmp_path / "cat.mp4"
    generate(
        tiny_tree,
        "tiny-t2v",
        "--prompt",
        "A cat walks on the grass.",
        "--frames",
        "13",
        "--width",
        "96",
        "--height",
        "64",
        "--fps",
        "12",
        "--steps",
        "3",
        "--output",
        str(out),
    )
    count, width, height, fps, _ = video_info(out)
    assert (count, width, height, fps) == (13, 96, 64, 12.0)
    meta = read_metadata(out)
    assert meta["prompt"] == "A cat walks on the grass." and meta["seed"] == 42 and meta["steps"] == 3
    assert meta["task"] == "tiny-t2v" and meta["guidance"] == 5.0 and meta["loras"] == []


def test_t2i_and_i2i_write_pngs_of_the_requested_size(tiny_tree, tmp_path, capsys):
    generate(
        tiny_tree,
        "tiny-t2i",
        "--prompt",
        "a red apple",
        "--width",
        "48",
        "--height",
        "80",
        "--output",
        str(tmp_path / "t2i.png"),
    )
    assert Image.open(tmp_path / "t2i.png").size == (48, 80)
    assert "attention: sdpa" in capsys.readouterr().out  # no flag: the fastest backend for the CPU
    Image.new("RGB", (120, 80), (10, 200, 30)).save(tmp_path / "src.jpg")
    generate(
        tiny_tree,
        "tiny-i2i",
        "--prompt",
        "make it blue",
        "--image",
        str(tmp_path / "src.jpg"),
        "--width",
        "64",
        "--height",
        "32",
        "--output",
        str(tmp_path / "i2i.png"),
    )
    assert Image.open(tmp_path / "i2i.png").size == (64, 32)
    assert read_metadata(tmp_path / "i2i.png")["image"] == str(tmp_path / "src.jpg")


def test_i2i_without_size_takes_the_nearest_allowed_aspect(tiny_tree, tmp_path):
    Image.new("RGB", (300, 100), (10, 200, 30)).save(tmp_path / "wide.png")
    generate(
        tiny_tree,
        "tiny-i2i",
        "--prompt",
        "x",
        "--image",
        str(tmp_path / "wide.png"),
        "--steps",
        "1",
        "--output",
        str(tmp_path / "out.png"),
    )
    width, height = Image.open(tmp_path / "out.png").size
    assert width > height and width % 16 == 0 and height % 16 == 0


def test_i2v_keeps_the_encoded_image_as_first_frame_and_decodes_it(tiny_tree, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "first.png")
    out = tmp_path / "clip.mp4"
    generate(
        tiny_tree,
        "tiny-i2v",
        "--prompt",
        "waves",
        "--image",
        str(tmp_path / "first.png"),
        "--width",
        "96",
        "--height",
        "64",
        "--seed",
        "5",
        "--save_latent",
        "--output",
        str(out),
    )
    count, width, height, _, frames = video_info(out)
    assert (count, width, height) == (9, 96, 64)
    vae = load_vae(tiny_tree / "vae", "hunyuan")
    pixels = image_to_pixels(resize_and_crop(load_image(tmp_path / "first.png"), 96, 64))
    image_latent = vae.encode(pixels, generator=torch.Generator().manual_seed(5))
    sampled = latent(tmp_path / "clip.mp4.latent.safetensors")
    assert torch.equal(sampled[:, :1], image_latent)  # the clean frame is put back after sampling
    assert not torch.allclose(sampled[:, 1:2], image_latent)
    decoded = pixels_to_frames(vae.decode(sampled)[0]).astype(float)
    luma = np.array([0.299, 0.587, 0.114])  # yuv420p halves chroma; compare what it keeps whole
    error = np.abs(frames[0] @ luma - decoded[0] @ luma).mean()
    assert error < 4.0 and error < np.abs(frames[0] @ luma - decoded[4] @ luma).mean()


def test_from_file_makes_one_output_per_line(tiny_tree, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 32 --h 48 --f 5 --d 7\n# a comment\n\nrain on a window --s 2 --g 1.0\n")
    generate(tiny_tree, "tiny-t2v", "--from_file", str(prompts), "--output", str(tmp_path / "out"), "--steps", "2")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["000_7.mp4", "001_42.mp4"]
    count, width, height, _, _ = video_info(tmp_path / "out" / "000_7.mp4")
    assert (count, width, height) == (5, 32, 48)
    assert read_metadata(tmp_path / "out" / "001_42.mp4")["guidance"] == 1.0


def test_same_seed_same_output_and_another_seed_another(tiny_tree, tmp_path):
    def run(name, seed):
        generate(
            tiny_tree,
            "tiny-t2v",
            "--prompt",
            "a dog",
            "--seed",
            str(seed),
            "--steps",
            "3",
            "--save_latent",
            "--output",
            str(tmp_path / f"{name}.mp4"),
        )
        return latent(tmp_path / f"{name}.mp4.latent.safetensors")

    first, again, other = run("a", 3), run("b", 3), run("c", 4)
    assert torch.equal(first, again) and not torch.allclose(first, other)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_saved_latents_decode_later_to_the_same_video(tiny_tree, tmp_path):
    generate(
        tiny_tree, "tiny-t2v", "--prompt", "a dog", "--steps", "2", "--save_latent", "--output", str(tmp_path / "a.mp4")
    )
    generate(
        tiny_tree,
        "tiny-t2v",
        "--latent_path",
        str(tmp_path / "a.mp4.latent.safetensors"),
        "--output",
        str(tmp_path / "again.mp4"),
    )
    assert video_info(tmp_path / "a.mp4")[4][3].tolist() == video_info(tmp_path / "again.mp4")[4][3].tolist()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--frames", "8"], "frames must be 4k\\+1 .* got 8; nearest: 5 or 9"),
        (["--width", "72"], "width must be a multiple of 16 .* got 72; nearest: 64 or 80"),
        (["--image", "x.png"], "takes no image"),
        (["--output", "x.png"], "is an image file but 9 frames"),
    ],
)
def test_bad_requests_are_named(tiny_tree, extra, message):
    with pytest.raises(SystemExit, match=message):
        generate(tiny_tree, "tiny-t2v", "--prompt", "x", *extra)


def test_wrong_checkpoint_fails_before_any_encoding(tiny_tree, tmp_path):
    with pytest.raises(SystemExit, match="does not fit task 'tiny-t2v'"):  # not the empty Qwen folder
        kandinsky5_generate_video.main(
            [
                "--task",
                "tiny-t2v",
                "--dit",
                str(tiny_tree / "model/tiny_t2i.safetensors"),
                "--text_encoder_qwen",
                str(tmp_path),  # a folder without a model: loading it would fail
                "--text_encoder_clip",
                str(tiny_tree / "text_encoder2"),
                "--vae",
                str(tiny_tree / "vae"),
                "--prompt",
                "x",
            ]
        )


def test_the_script_runs_as_a_program(tiny_tree, tmp_path):
    out = tmp_path / "s.png"
    command = [
        sys.executable,
        "kandinsky5_generate_video.py",
        "--task",
        "tiny-t2i",
        "--dit",
        str(tiny_tree / "model/tiny_t2i.safetensors"),
        "--vae",
        str(tiny_tree / "flux/vae"),
        "--text_encoder_qwen",
        str(tiny_tree / "text_encoder"),
        "--text_encoder_clip",
        str(tiny_tree / "text_encoder2"),
        "--prompt",
        "x",
        "--steps",
        "2",
        "--output",
        str(out),
        "--text_encoder_dtype",
        "fp8",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (64, 64) and "sampling 1" in result.stderr  # the progress bar


@pytest.mark.parametrize(
    "output, message",
    [
        ("clip.gif", "unknown extension '.gif'"),
        ("clip.webm", "unknown extension '.webm'"),
        ("clip", "unknown extension '\\(none\\)'"),
        ("folder.mp4", "is a folder"),
        ("/proc/clip.mp4", "its folder /proc: files cannot be made there"),  # writable to root, but holds no files
    ],
)
def test_the_output_is_checked_before_anything_loads(tiny_tree, tmp_path, output, message):
    (tmp_path / "folder.mp4").mkdir()
    with pytest.raises(SystemExit, match=message):  # the Qwen folder does not exist: nothing was loaded
        generate(
            tiny_tree, "tiny-t2v", "--prompt", "x", "--text_encoder_qwen", "missing", "--output", str(tmp_path / output)
        )


def test_every_supported_extension_is_written(tiny_tree, tmp_path):
    for name in ("a.mov", "b.mkv"):
        generate(
            tiny_tree, "tiny-t2v", "--prompt", "x", "--steps", "1", "--frames", "5", "--output", str(tmp_path / name)
        )
        assert video_info(tmp_path / name)[0] == 5
    for name in ("c.jpg", "d.webp"):
        generate(tiny_tree, "tiny-t2i", "--prompt", "x", "--steps", "1", "--output", str(tmp_path / name))
        assert Image.open(tmp_path / name).size == (64, 64)


def test_save_latent_writes_the_output_name_plus_latent_safetensors(tiny_tree, tmp_path):
    out = tmp_path / "x.mp4"
    generate(tiny_tree, "tiny-t2v", "--prompt", "x", "--steps", "1", "--save_latent", "--output", str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.mp4", "x.mp4.latent.safetensors"]


@pytest.mark.parametrize("kind", ["missing", "not_safetensors", "other_safetensors"])
def test_a_wrong_latent_path_is_named(tiny_tree, tmp_path, kind):
    from safetensors.torch import save_file

    path = tmp_path / "l.safetensors"
    if kind == "not_safetensors":
        path.write_text("not a latent")
    elif kind == "other_safetensors":
        save_file({"weight": torch.zeros(2)}, str(path))
    message = {
        "missing": "no such file",
        "not_safetensors": "not a safetensors file",
        "other_safetensors": "not a latent",
    }
    with pytest.raises(SystemExit, match=f"--latent_path {path}: {message[kind]}"):
        generate(tiny_tree, "tiny-t2v", "--latent_path", str(path), "--vae", "missing-vae")


def test_i2i_without_an_image_is_text_to_image_with_the_image_template(tiny_tree, tmp_path):
    """As the official I2I pipeline: no source image, the plain image template (no edit template)."""
    from kandinsky5.encoders.prompt_templates import TEMPLATES
    from kandinsky5.encoders.text_encoders import load_prompt_encoder
    from kandinsky5.inference.generate import encode_texts
    from kandinsky5.inference.jobs import build_jobs
    from kandinsky5.model.tasks import get_task

    from .generation_helpers import kandinsky5_generate_video

    task = get_task("tiny-i2i")
    for dtype in ("bfloat16", "float32"):
        out = tmp_path / f"edit_{dtype}.png"
        generate(
            tiny_tree, "tiny-i2i", "--prompt", "a snowy street", "--steps", "2", "--dtype", dtype, "--output", str(out)
        )
        assert np.asarray(Image.open(out)).std() > 0
    args = kandinsky5_generate_video.parser().parse_args(
        [
            "--task",
            "tiny-i2i",
            "--prompt",
            "a snowy street",
            "--guidance",
            "1",
            "--text_encoder_dtype",
            "float32",
            "--no_expand_prompt",
        ]
    )
    args.text_encoder_qwen, args.text_encoder_clip = tiny_tree / "text_encoder", tiny_tree / "text_encoder2"
    ((cond, _),) = encode_texts(args, task, build_jobs(args, task), "cpu")
    encoder = load_prompt_encoder(args.text_encoder_qwen, args.text_encoder_clip, task.dit_params, "cpu", "float32")
    expected = encoder.encode(["a snowy street"], TEMPLATES["image"], task.qwen_max_length, None)
    assert torch.equal(cond.embeddings, expected.embeddings.cpu())


@pytest.mark.parametrize("frames", [5, 9, 13])
def test_i2v_with_two_to_four_latent_frames_stays_finite(tiny_tree, tmp_path, frames):
    """The official first-frame normalisation takes its reference from latent frames 4-8, which
    such clips lack (a mean of nothing: NaN); ours leaves them as sampled."""
    from kandinsky5.inference.denoiser import normalize_first_frames

    latents = torch.randn(1, (frames - 1) // 4 + 1, 4, 4, 16)
    assert torch.equal(normalize_first_frames(latents), latents)
    Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(tmp_path / "first.png")
    out = tmp_path / "clip.mp4"
    generate(
        tiny_tree, "tiny-i2v", "--image", str(tmp_path / "first.png"), "--prompt", "waves", "--frames", str(frames),
        "--steps", "2", "--save_latent", "--output", str(out),
    )  # fmt: skip
    assert torch.isfinite(latent(tmp_path / "clip.mp4.latent.safetensors")).all()
    assert video_info(out)[0] == frames


def test_every_missing_weight_is_named_in_one_message_before_anything_loads(tiny_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no weights/ folder here: the defaults are missing too
    with pytest.raises(SystemExit) as stopped:
        kandinsky5_generate_video.main(
            ["--task", "tiny-t2v", "--prompt", "x", "--dit", "nowhere.safetensors", "--text_encoder_clip",
             str(tiny_tree / "text_encoder2"), "--lora_weight", "absent_lora.safetensors"]
        )  # fmt: skip
    assert str(stopped.value.code) == (
        "error: --dit nowhere.safetensors; weights/vae (the default of --vae, which was not given); "
        "weights/text_encoder (the default of --text_encoder_qwen, which was not given); "
        "--lora_weight absent_lora.safetensors do not exist. The layout of the weights is in docs/weights.md; "
        "python -m kandinsky5.download --task tiny-t2v fetches the task's files"
    )
