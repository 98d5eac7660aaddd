"""kandinsky5_caption.py: Qwen2.5-VL captions for a dataset's images and videos, on the tiny tree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import kandinsky5_caption
from kandinsky5.captioning.captioner import Captioner, CaptionSettings, Media, clean
from kandinsky5.captioning.qwen_vision import VideoSampling, smart_resize, video_inputs
from kandinsky5.encoders.text_encoders import QwenEncoder
from kandinsky5.tiny import write_qwen_single_file

from .media_factory import caption, write_image, write_video


@pytest.fixture(scope="module")
def qwen(tiny_tree):
    return QwenEncoder(tiny_tree / "text_encoder", "cpu", torch.float32)


def test_video_patches_are_the_image_processors_patches_in_qwens_layout(qwen):
    """A still video's patches equal the image processor's (which repeats an image over the two frames of
    a temporal patch); the grid follows the options; the model takes the inputs (its token count check)."""
    rng = np.random.default_rng(0)
    still = Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8))  # 28-multiples: no resize
    sampling = VideoSampling(fps=2.0, max_frames=32, max_pixels=56 * 84, min_pixels=28 * 28)
    inputs = video_inputs([still] * 24, 8.0, sampling)  # 3 s at 8 fps -> 6 frames at 2 fps -> 3 temporal patches
    assert inputs["video_grid_thw"].tolist() == [[3, 4, 6]]
    assert inputs["second_per_grid_ts"].tolist() == pytest.approx([2 / 2.0])
    image = qwen._image_processor()(images=[still], return_tensors="pt")
    assert image["image_grid_thw"].tolist() == [[1, 4, 6]]
    per_step = image["pixel_values"].shape[0]
    for step in range(3):
        torch.testing.assert_close(inputs["pixel_values_videos"][step * per_step : (step + 1) * per_step],
                                   image["pixel_values"], rtol=1e-5, atol=1e-5)  # fmt: skip
    capped = video_inputs([still] * 24, 8.0, VideoSampling(max_frames=4, max_pixels=28 * 28 * 2, min_pixels=28 * 28))
    assert capped["video_grid_thw"].tolist() == [[2, 2, 2]]  # 4 frames; 56x84 scaled to at most 1568 pixels
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as transformers_resize

    for height, width, low, high in ((480, 640, 28 * 28, 360 * 420), (20, 900, 128 * 28 * 28, 28 * 28 * 768),
                                     (1080, 1920, 28 * 28, 360 * 420), (57, 85, 28 * 28, 10**6)):  # fmt: skip
        assert smart_resize(height, width, low, high) == transformers_resize(height, width, 28, low, high)
    captioner = Captioner(qwen, CaptionSettings(max_new_tokens=3))
    frames = [Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)) for _ in range(9)]
    tokens = captioner.inputs([Media(frames=frames, fps=24.0)])
    count = int(tokens["video_grid_thw"].prod()) // 4
    assert int((tokens["input_ids"] == qwen.model.config.video_token_id).sum()) == count
    assert len(captioner.caption([Media(frames=frames, fps=24.0)])) == 1


def test_clean_makes_one_line_of_plain_text():
    assert clean("**A fox** runs.\n\nIt <|im_end|> jumps\ufffd ") == "A fox runs. It jumps"


def dataset(root):
    photos, clips, rows = root / "photos", root / "clips", root / "rows"
    for folder in (photos, clips, rows):
        folder.mkdir()
    write_image(photos / "wide.png", 96, 48, seed=1)
    write_image(photos / "tall.png", 40, 90, seed=2)
    caption(write_image(photos / "done.png", 64, 64, seed=3), "a caption written by hand", ".caption")
    (photos / "broken.png").write_bytes(b"not a png")
    write_video(clips / "short.mp4", 9, 64, 48, seed=4)
    write_video(clips / "long.mp4", 40, 48, 64, fps=12, seed=5)
    write_image(rows / "a.png", 64, 48, seed=6)
    (rows / "rows.jsonl").write_text(
        json.dumps({"image_path": "a.png", "caption": "", "extra": 1}) + "\n" + json.dumps({"image_path": "a.png"})
        + "\n"
    )  # fmt: skip
    config = root / "data.toml"
    config.write_text(f"""
[general]
resolution = 64
caption_extension = ".caption"
[[datasets]]
image_directory = "{photos}"
cache_directory = "{root / "cache1"}"
[[datasets]]
video_directory = "{clips}"
cache_directory = "{root / "cache2"}"
target_frames = [9]
[[datasets]]
image_jsonl_file = "{rows / "rows.jsonl"}"
cache_directory = "{root / "cache3"}"
""")
    return config


def run(capsys, *argv):
    try:
        kandinsky5_caption.main([*argv, "--max_new_tokens", "6"])
        code = 0
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_dataset_is_captioned_where_its_config_reads_captions(tiny_tree, tmp_path, capsys):
    config = dataset(tmp_path)
    qwen = ["--text_encoder_qwen", str(tiny_tree / "text_encoder"), "--prefix", "zxq style, "]
    code, out, err = run(capsys, "--dataset_config", str(config), *qwen, "--batch_size", "2")
    assert code == 1  # the broken image failed, named; the rest were captioned
    assert f"failed: {tmp_path / 'photos/broken.png'}: cannot read" in err
    assert "captioned 6, kept 1 existing, failed 1" in out
    written = {p: (tmp_path / p).read_text() for p in ("photos/wide.caption", "photos/tall.caption",
                                                        "clips/short.caption", "clips/long.caption")}  # fmt: skip
    assert all(text.startswith("zxq style, ") and text.count("\n") == 1 for text in written.values())
    assert (tmp_path / "photos/done.caption").read_text().strip() == "a caption written by hand"
    rows = [json.loads(line) for line in (tmp_path / "rows/rows.jsonl").read_text().splitlines()]
    assert all(row["caption"].startswith("zxq style, ") for row in rows) and rows[0]["extra"] == 1

    # again: everything kept; with --overwrite the same captions (greedy), the hand-written one replaced
    code, out, _ = run(capsys, "--dataset_config", str(config), *qwen, "--skip_existing")
    assert "captioned 0, kept 7 existing, failed 1" in out
    code, out, _ = run(capsys, "--dataset_config", str(config), *qwen, "--overwrite")
    assert "captioned 7, kept 0 existing" in out
    assert all((tmp_path / p).read_text() == text for p, text in written.items())
    assert (tmp_path / "photos/done.caption").read_text().startswith("zxq style, ")


def test_sampled_captions_repeat_with_the_seed_and_the_single_file_qwen_works(tiny_tree, tmp_path, capsys):
    folder = tmp_path / "media"
    folder.mkdir()
    write_image(folder / "one.png", 64, 48, seed=7)
    write_video(folder / "two.mp4", 13, 48, 48, seed=8)
    file = tmp_path / "qwen_2.5_vl_7b.safetensors"
    write_qwen_single_file(file, 3, lm_head=True)
    sampled = ["--temperature", "1.0", "--seed", "5", "--overwrite"]
    texts = []
    for qwen in (str(file), str(file), str(tiny_tree / "text_encoder")):
        code, out, err = run(capsys, "--folder", str(folder), "--text_encoder_qwen", qwen, *sampled)
        assert code == 0, err
        texts.append([(folder / name).read_text() for name in ("one.txt", "two.txt")])
    assert texts[0] == texts[1]
    code, out, err = run(capsys, "--folder", str(folder), "--text_encoder_qwen", str(tiny_tree / "text_encoder"),
                         "--text_encoder_dtype", "fp8", "--overwrite")  # fmt: skip
    assert code == 0 and "captioned 2" in out, err
    headless = tmp_path / "no_head.safetensors"
    write_qwen_single_file(headless, 3)
    code, _, _ = run(capsys, "--folder", str(folder), "--text_encoder_qwen", str(headless))
    assert "holds no lm_head.weight" in str(code)


def test_bad_paths_are_named_before_qwen_loads(tmp_path, capsys):
    code, _, _ = run(capsys, "--folder", str(tmp_path / "absent"))
    assert f"--folder {tmp_path / 'absent'} is not a folder" in str(code)
    (tmp_path / "media").mkdir()
    write_image(tmp_path / "media" / "a.png", 32, 32)
    code, _, _ = run(capsys, "--folder", str(tmp_path / "media"), "--text_encoder_qwen", str(tmp_path / "q"))
    assert "--text_encoder_qwen" in str(code) and "does not exist" in str(code)


def test_the_instruction_comes_from_prompt_or_prompt_file(tiny_tree, tmp_path, capsys):
    folder = tmp_path / "media"
    folder.mkdir()
    write_image(folder / "one.png", 64, 48, seed=9)
    instruction = tmp_path / "instruction.txt"
    instruction.write_text("Name the colours of this {kind} in three words.\n")
    qwen = ["--folder", str(folder), "--text_encoder_qwen", str(tiny_tree / "text_encoder"), "--overwrite"]
    captions = []
    for extra in (
        [],
        ["--prompt_file", str(instruction)],
        ["--prompt", "Name the colours of this {kind} in three words."],
    ):
        code, _, err = run(capsys, *qwen, *extra)
        assert code == 0, err
        captions.append((folder / "one.txt").read_text())
    assert captions[1] == captions[2] != captions[0]
    code, _, _ = run(capsys, *qwen, "--prompt", "x", "--prompt_file", str(instruction))
    assert "give --prompt or --prompt_file, not both" in str(code)
