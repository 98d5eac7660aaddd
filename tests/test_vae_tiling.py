"""Generation decodes in overlapping tiles by default (as the official pipelines) and in one piece
with --no_vae_tiling, for the video VAE (tiles and chunks of frames) and the FLUX image VAE (tiles);
tiled and one-piece decodes of the same latent agree within a stated tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kandinsky5.encoders.vae import load_vae
from kandinsky5.inference.media import load_image, pixels_to_frames

from .generation_helpers import generate
from .test_generate_cli import video_info

# tiny-t2v: 320 px > the video VAE's 256 px tiles; tiny-t2i: 128 px > the tiny FLUX VAE's 64 px (its sample_size)
CASES = {"tiny-t2v": ("hunyuan", "vae", 320, 9, ".mp4"), "tiny-t2i": ("flux", "flux/vae", 128, 1, ".png")}


def decoded(tree, kind, folder, latent, tiled: bool) -> np.ndarray:
    vae = load_vae(tree / folder, kind)
    vae.set_decode_tiling(tiled)
    return pixels_to_frames(vae.decode(latent)[0]).astype(np.float64)


def written(path) -> np.ndarray:
    if path.suffix == ".png":
        return np.asarray(load_image(path), dtype=np.float64)[None]
    return np.stack(video_info(path)[4]).astype(np.float64)


@pytest.mark.parametrize("task", list(CASES))
def test_generation_decodes_tiled_by_default_and_in_one_piece_with_no_vae_tiling(tiny_tree, tmp_path, task, capsys):
    kind, folder, side, frames, extension = CASES[task]
    size = ["--width", str(side), "--height", str(side), "--frames", str(frames), "--steps", "2", "--save_latent"]
    default, one_piece = tmp_path / f"default{extension}", tmp_path / f"one_piece{extension}"
    generate(tiny_tree, task, "--prompt", "a fox", *size, "--output", str(default))
    assert "VAE decode: tiles of" in capsys.readouterr().out
    generate(tiny_tree, task, "--prompt", "a fox", *size, "--output", str(one_piece), "--no_vae_tiling")
    assert "VAE decode: in one piece (--no_vae_tiling)" in capsys.readouterr().out
    latent = load_file(f"{default}.latent.safetensors")["latent"]
    assert torch.equal(latent, load_file(f"{one_piece}.latent.safetensors")["latent"])  # only the decoding differs

    tiled, whole = decoded(tiny_tree, kind, folder, latent, True), decoded(tiny_tree, kind, folder, latent, False)
    assert np.abs(tiled - whole).mean() > 1.0  # tiling is visible at this test's sizes
    # the saved latent decoded again with the tiling spelled out, and in one piece
    explicit, again_whole = tmp_path / f"explicit{extension}", tmp_path / f"again_whole{extension}"
    tiles = ["--vae_tiling", "--vae_tile_size", "256" if kind == "hunyuan" else "64", "--vae_tile_frames", "16"]
    generate(tiny_tree, task, "--latent_path", f"{default}.latent.safetensors", "--output", str(explicit), *tiles)
    generate(tiny_tree, task, "--latent_path", f"{default}.latent.safetensors", "--output", str(again_whole),
             "--no_vae_tiling")  # fmt: skip
    assert np.array_equal(written(default), written(explicit))
    assert np.array_equal(written(one_piece), written(again_whole))
    assert not np.array_equal(written(default), written(one_piece))
    if extension == ".png":  # lossless: the files hold the decodes themselves
        assert np.abs(written(default) - tiled).max() <= 1 and np.abs(written(one_piece) - whole).max() <= 1


@pytest.mark.parametrize("kind,folder,frames", [("hunyuan", "vae", 3), ("flux", "flux/vae", 1)])
def test_tiled_and_one_piece_decodes_agree_within_the_stated_tolerance(tiny_tree, kind, folder, frames):
    """A latent of sampler-like statistics (seeded normal), 512 x 512 px: 256 px tiles overlap by 64 px.
    Each tile's GroupNorm and mid-block attention see the tile, not the frame, so the two decodes are
    not equal anywhere; measured on the tiny random VAEs, the mean difference is about 0.025 (in
    [-1, 1], the output's std is about 0.3) inside tiles and across seams alike, where the blend leaves
    no step. Stated tolerance: mean |difference| <= 0.05 in both regions."""
    vae = load_vae(tiny_tree / folder, kind)
    latent = torch.randn(1, frames, 64, 64, 16, generator=torch.Generator().manual_seed(0))
    vae.set_decode_tiling(False)
    whole = vae.decode(latent)
    vae.set_decode_tiling(True, tile_size=256, tile_frames=16)
    tiled = vae.decode(latent)
    assert tiled.shape == whole.shape
    difference = (tiled - whole).abs()
    seams = torch.zeros(512, dtype=torch.bool)
    seams[192:256] = seams[384:448] = True  # the blended overlaps of the 256 px tiles at stride 192
    inside = ~seams[:, None] & ~seams[None, :]
    assert difference[..., inside].mean() <= 0.05
    assert difference[..., ~inside].mean() <= 0.05
    assert not torch.equal(tiled, whole)
