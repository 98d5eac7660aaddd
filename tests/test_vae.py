import json

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo

from kandinsky5.encoders.vae import VAEError, load_vae


def pixels(batch, frames, height, width, seed=0):
    return torch.rand(batch, 3, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_video_round_trip_shapes_and_scale(tiny_tree):
    vae = load_vae(tiny_tree / "vae", "hunyuan")
    x = pixels(1, 17, 64, 48)
    latents = vae.encode(x, sample=False)
    assert latents.shape == (1, 5, 8, 6, 16)  # 17 frames -> 5 latent frames, 8x smaller
    raw = vae.model.encode(x).latent_dist.mode()
    assert torch.allclose(latents, raw.permute(0, 2, 3, 4, 1) * 0.476986)
    assert vae.decode(latents).shape == (1, 3, 17, 64, 48)


def test_posterior_sample_is_seeded(tiny_tree):
    vae = load_vae(tiny_tree / "vae", "hunyuan")
    x = pixels(1, 5, 32, 32)
    a = vae.encode(x, generator=torch.Generator().manual_seed(3))
    b = vae.encode(x, generator=torch.Generator().manual_seed(3))
    c = vae.encode(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_image_round_trip_without_shift(tiny_tree):
    vae = load_vae(tiny_tree / "flux" / "vae", "flux")
    x = pixels(2, 1, 64, 40)
    latents = vae.encode(x, sample=False)
    assert latents.shape == (2, 1, 8, 5, 16)
    raw = vae.model.encode(x[:, :, 0]).latent_dist.mode()
    assert torch.allclose(latents[:, 0], raw.permute(0, 2, 3, 1) * 0.3611)  # scaled, never shifted
    assert vae.decode(latents).shape == (2, 3, 1, 64, 40)


def test_original_pt_layout_and_diffusers_layout_load_identical_weights(tiny_tree, tmp_path):
    diffusers_layout = load_vae(tiny_tree / "vae", "hunyuan")
    state = {f"vae.{k}": v for k, v in diffusers_layout.model.state_dict().items()}
    folder = tmp_path / "original"
    folder.mkdir()
    torch.save({"state_dict": state}, folder / "pytorch_model.pt")
    config = json.loads((tiny_tree / "vae" / "config.json").read_text())
    original = {"_class_name": "AutoencoderKLCausal3D", "sample_tsize": 64, "time_compression_ratio": 4}
    original.update(
        {
            k: config[k]
            for k in (
                "block_out_channels",
                "layers_per_block",
                "norm_num_groups",
                "latent_channels",
                "in_channels",
                "out_channels",
            )
        }
    )
    (folder / "config.json").write_text(json.dumps(original))
    for path in (folder, folder / "pytorch_model.pt", tiny_tree / "vae" / "diffusion_pytorch_model.safetensors"):
        loaded = load_vae(path, "hunyuan").model.state_dict()
        reference = diffusers_layout.model.state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference), path


def test_single_file_without_config_uses_the_official_configuration(tiny_tree, tmp_path):
    import shutil

    shutil.copy(tiny_tree / "vae" / "diffusion_pytorch_model.safetensors", tmp_path / "vae.safetensors")
    with pytest.raises(VAEError, match="vae.safetensors does not fit its VAE config: missing"):
        load_vae(tmp_path / "vae.safetensors", "hunyuan")  # tiny weights against the real architecture
    assert AutoencoderKLHunyuanVideo().config.scaling_factor == 0.476986


def test_wrong_frame_counts_and_the_wrong_vae_kind_are_clear_errors(tiny_tree):
    video = load_vae(tiny_tree / "vae", "hunyuan")
    with pytest.raises(VAEError, match="needs 4k\\+1 frames .* got 16; nearest: 13 or 17"):
        video.encode(pixels(1, 16, 32, 32))
    image = load_vae(tiny_tree / "flux" / "vae", "flux")
    with pytest.raises(VAEError, match="encodes single images, got 5 frames"):
        image.encode(pixels(1, 5, 32, 32))
    with pytest.raises(VAEError, match="is the FLUX.1 image VAE .* task 'k5-lite-t2v-5s-sd' needs the HunyuanVideo"):
        load_vae(tiny_tree / "flux" / "vae", "hunyuan", task_name="k5-lite-t2v-5s-sd")
    with pytest.raises(VAEError, match="is the HunyuanVideo 3-D VAE .* needs the FLUX.1 image VAE"):
        load_vae(tiny_tree / "vae", "flux")


def test_unreadable_and_missing_vae_files(tmp_path):
    with pytest.raises(VAEError, match="does not exist"):
        load_vae(tmp_path / "nothing", "hunyuan")
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(VAEError, match="cannot read VAE weights .*bad.safetensors"):
        load_vae(tmp_path / "bad.safetensors", "hunyuan")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VAEError, match="no VAE weights in"):
        load_vae(tmp_path / "empty", "hunyuan")


def test_tiling_is_applied_and_keeps_shapes(tiny_tree):
    vae = load_vae(tiny_tree / "vae", "hunyuan")
    x = pixels(1, 5, 96, 96)
    latents = vae.encode(x, sample=False)
    plain = vae.decode(latents)
    vae.enable_tiling(tile_size=128)  # one tile covers the frame: nothing changes
    assert torch.equal(vae.decode(latents), plain)
    vae.enable_tiling(tile_size=64)  # 2x2 overlapping tiles (GroupNorm then sees each tile alone)
    tiled_latents = vae.encode(x, sample=False)
    tiled = vae.decode(latents)
    assert tiled_latents.shape == latents.shape and tiled.shape == plain.shape
    assert not torch.equal(tiled, plain)
