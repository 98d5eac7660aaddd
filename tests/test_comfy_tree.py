"""A ComfyUI models folder as it is: generation, caching and training with --comfy_models_dir on the
tiny tree that `python -m kandinsky5.tiny DIR --comfyui` writes (single files in ComfyUI's key layouts)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

import kandinsky5_cache_latents
import kandinsky5_cache_text_encoder_outputs
import kandinsky5_generate_video
import kandinsky5_train_network
from kandinsky5.encoders.vae import load_vae
from kandinsky5.tiny import COMFY_FILES, build_comfy_tree

from .media_factory import caption, write_image, write_video


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    return build_comfy_tree(tmp_path_factory.mktemp("comfy") / "models")


def test_the_comfyui_tree_has_comfyuis_file_names_and_layouts(comfy):
    for name in COMFY_FILES.values():
        assert (comfy / name).is_file(), name
    bfl = load_file(str(comfy / COMFY_FILES["flux_vae"]))
    assert "encoder.down.0.block.0.conv1.weight" in bfl and "decoder.up.0.block.0.conv1.weight" in bfl
    assert all(t.dtype == torch.bfloat16 for t in bfl.values())
    qwen = load_file(str(comfy / COMFY_FILES["qwen"]))
    assert "model.layers.0.self_attn.q_proj.weight" in qwen and "visual.blocks.0.attn.qkv.weight" in qwen
    fp8 = load_file(str(comfy / COMFY_FILES["qwen_fp8"]))
    assert fp8["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.0.self_attn.q_proj.scale_weight" in fp8 and "scaled_fp8" in fp8


def test_single_file_vaes_load_as_the_diffusers_folders(comfy, tiny_tree):
    """Same seeds, so the same weights: the ComfyUI files (bf16) equal the tiny tree's folders rounded to bf16."""
    for kind, name, folder in (("flux", "flux_vae", "flux/vae"), ("hunyuan", "hunyuan_vae", "vae")):
        single = load_vae(comfy / COMFY_FILES[name], kind).model.state_dict()
        reference = load_vae(tiny_tree / folder, kind).model.state_dict()
        assert single.keys() == reference.keys()
        assert all(torch.equal(single[k], reference[k].bfloat16().float()) for k in single), kind


def generate(comfy, tmp_path, task: str, name: str, *extra: str):
    output = tmp_path / name
    kandinsky5_generate_video.main(
        [
            "--task",
            task,
            "--comfy_models_dir",
            str(comfy),
            "--prompt",
            "a red fox in the snow",
            "--steps",
            "2",
            "--dtype",
            "float32",
            "--save_latent",
            "--output",
            str(output),
            *extra,
        ]
    )
    return load_file(str(output) + ".latent.safetensors")["latent"]


def test_generation_picks_each_file_and_says_which(comfy, tmp_path, capsys):
    video = generate(comfy, tmp_path, "tiny-t2v", "fox.mp4", "--frames", "5")
    out = capsys.readouterr().out
    for option, name in (
        ("dit", "diffusion_models/tiny_t2v.safetensors"),
        ("vae", COMFY_FILES["hunyuan_vae"]),
        ("text_encoder_qwen", COMFY_FILES["qwen"]),
        ("text_encoder_clip", COMFY_FILES["clip"]),
    ):
        assert f"--comfy_models_dir: --{option} {comfy / name}" in out
    explicit = [
        "--dit",
        str(comfy / "diffusion_models/tiny_t2v.safetensors"),
        "--vae",
        str(comfy / COMFY_FILES["hunyuan_vae"]),
        "--text_encoder_qwen",
        str(comfy / COMFY_FILES["qwen"]),
        "--text_encoder_clip",
        str(comfy / COMFY_FILES["clip"]),
    ]
    same = generate(comfy, tmp_path, "tiny-t2v", "fox2.mp4", "--frames", "5", *explicit)
    assert torch.equal(video, same)
    image = generate(comfy, tmp_path, "tiny-t2i", "fox.png", "--text_encoder_dtype", "fp8")
    assert image.shape[1] == 1 and torch.isfinite(image).all()
    assert f"--text_encoder_qwen {comfy / COMFY_FILES['qwen_fp8']}" in capsys.readouterr().out  # fp8 preferred


def test_cache_and_train_from_the_comfyui_folder(comfy, tmp_path):
    (tmp_path / "clips").mkdir()
    caption(write_video(tmp_path / "clips" / "walk.mp4", 9, 64, 64), "a man walks along a pier")
    caption(write_image(tmp_path / "clips" / "pier.png", 64, 64), "a pier at dusk")
    config = tmp_path / "data.toml"
    config.write_text(f"""
[general]
resolution = 64
[[datasets]]
video_directory = "{tmp_path / "clips"}"
cache_directory = "{tmp_path / "cache"}"
target_frames = [9]
""")
    common = ["--dataset_config", str(config), "--task", "tiny-t2v", "--comfy_models_dir", str(comfy)]
    kandinsky5_cache_latents.main(common)
    kandinsky5_cache_text_encoder_outputs.main(common)
    out = tmp_path / "out"
    kandinsky5_train_network.main(
        [
            *common,
            "--output_dir",
            str(out),
            "--output_name",
            "lora",
            "--max_train_steps",
            "2",
            "--mixed_precision",
            "no",
            "--max_data_loader_n_workers",
            "0",
        ]
    )
    assert (out / "lora.safetensors").is_file()


def test_what_the_folder_lacks_is_named(comfy, tmp_path, capsys):
    partial = tmp_path / "models"
    shutil.copytree(comfy / "text_encoders", partial / "text_encoders")
    with pytest.raises(SystemExit):
        kandinsky5_cache_latents.main(
            ["--dataset_config", str(tmp_path / "x.toml"), "--comfy_models_dir", str(partial)]
        )
    assert "--comfy_models_dir: no hunyuan_video_vae_bf16.safetensors" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="is not a folder"):
        kandinsky5_cache_latents.main(["--dataset_config", "x.toml", "--comfy_models_dir", str(tmp_path / "none")])


def test_a_lora_named_like_the_dit_is_passed_over_by_its_contents(comfy, tmp_path, capsys):
    """#34: `<dit name>_anime_lora.safetensors` beside the DiT matched the DiT's name pattern and was taken."""
    from safetensors.torch import save_file

    folder = tmp_path / "models"
    shutil.copytree(comfy, folder)
    models = folder / "diffusion_models"
    (models / "tiny_t2v.safetensors").rename(models / "tiny_t2v_fp8.safetensors")  # no exact name: patterns decide
    lora = models / "tiny_t2v_anime_lora.safetensors"  # sorts before the DiT
    save_file({"lora_unet_visual_transformer_blocks_0_self_attention_to_query.lora_down.weight": torch.zeros(4, 64)},
              str(lora))  # fmt: skip
    generate(folder, tmp_path, "tiny-t2v", "fox.mp4", "--frames", "5")
    out = capsys.readouterr().out
    assert f"--comfy_models_dir: passed over {lora} (a LoRA) for --dit" in out
    assert f"--comfy_models_dir: --dit {models / 'tiny_t2v_fp8.safetensors'}" in out
