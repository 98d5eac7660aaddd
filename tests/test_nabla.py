import itertools

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from kandinsky5.model import nabla
from kandinsky5.model.nabla import (
    BLOCK,
    block_map,
    dense_masked_attention,
    flex_block_mask,
    fractal_order,
    raster_order,
    sta_mask,
)
from kandinsky5.model.tasks import NablaParams

from .dit_helpers import random_dit, random_inputs
from .generation_helpers import sampled_latent


def test_fractal_order_puts_each_8x8_tile_together_and_round_trips():
    grid = (2, 16, 24)
    positions = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1).reshape(1, -1, 3)
    ordered = fractal_order(positions, grid)[0]
    first_tile = ordered[:BLOCK]
    assert (first_tile[:, 0] == 0).all() and first_tile[:, 1].max() == 7 and first_tile[:, 2].max() == 7
    assert ordered[BLOCK].tolist() == [0, 0, 8]  # the next tile, to the right
    x = torch.randn(3, 2 * 16 * 24, 5)
    assert torch.equal(raster_order(fractal_order(x, grid), grid), x)


def test_sta_mask_matches_its_definition():
    t, hb, wb, wT, wH, wW = 3, 2, 4, 3, 1, 3
    mask = sta_mask(t, hb, wb, wT, wH, wW)
    tiles = list(itertools.product(range(t), range(hb), range(wb)))
    for i, (a, b, c) in enumerate(tiles):
        for j, (d, e, f) in enumerate(tiles):
            assert bool(mask[i, j]) == (abs(a - d) <= wT // 2 and abs(b - e) <= wH // 2 and abs(c - f) <= wW // 2)


def test_block_map_keeps_the_smallest_set_holding_p_of_the_mass():
    torch.manual_seed(0)
    q, k = torch.randn(1, 8 * BLOCK, 2, 16), torch.randn(1, 8 * BLOCK, 2, 16)
    nothing = torch.zeros(8, 8, dtype=torch.bool)
    params = NablaParams(P=0.6, add_sta=False)
    kept = block_map(q, k, nothing, params)
    qa = q.reshape(1, 8, BLOCK, 2, 16).mean(2).transpose(1, 2)
    ka = k.reshape(1, 8, BLOCK, 2, 16).mean(2).transpose(1, 2)
    scores = torch.softmax(qa @ ka.transpose(-1, -2) / 4.0, -1)
    mass = (scores * kept).sum(-1)
    assert (mass >= 0.6 - 1e-6).all()
    smallest_kept = torch.where(kept, scores, torch.inf).min(-1).values
    assert (mass - smallest_kept < 0.6).all()  # dropping any kept block would fall below P
    with_sta = block_map(q, k, torch.eye(8, dtype=torch.bool), NablaParams(P=0.6))
    assert torch.equal(with_sta, kept | torch.eye(8, dtype=torch.bool))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_block_sparse_kernel_equals_dense_attention_with_the_expanded_mask():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 4 * BLOCK, 2, 16) for _ in range(3))
    blocks = torch.rand(1, 2, 4, 4) > 0.5
    blocks[..., torch.arange(4), torch.arange(4)] = True  # every query block keeps at least one key block
    # eager flex_attention ignores block structure unless a mask_mod restates it (compiled kernels need none)
    mask = flex_block_mask(blocks, mask_mod=lambda b, h, qi, ki: blocks[b, h, qi // BLOCK, ki // BLOCK])
    sparse = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask).transpose(1, 2)
    assert torch.allclose(sparse, dense_masked_attention(q, k, v, blocks), atol=1e-5)


@pytest.mark.parametrize("chunk_bytes", [1, 2**28])  # one query block at a time, or all at once
def test_gathered_block_attention_equals_dense_attention_with_the_expanded_mask(monkeypatch, chunk_bytes):
    monkeypatch.setattr(nabla, "GATHER_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 6 * BLOCK, 3, 16, generator=g) for _ in range(3))
    blocks = torch.rand(2, 3, 6, 6, generator=g) < 0.4  # kept counts differ between query blocks
    blocks[..., torch.arange(6), torch.arange(6)] = True
    expected = dense_masked_attention(q, k, v, blocks)
    torch.testing.assert_close(nabla.gathered_block_attention(q, k, v, blocks), expected, rtol=1e-5, atol=1e-5)


def test_nabla_with_everything_kept_equals_dense_attention_and_sparse_differs():
    model = random_dit("tiny-t2v")
    x, text, pooled, t = random_inputs(model, 1, 3, 32, 16, 5)
    with torch.no_grad():
        dense = model(x, text, pooled, t, rope_scale=(1.0, 2.0, 2.0))
        full = model(x, text, pooled, t, rope_scale=(1.0, 2.0, 2.0), nabla=NablaParams(P=1.0, wT=99, wH=99, wW=99))
        sparse = model(x, text, pooled, t, rope_scale=(1.0, 2.0, 2.0), nabla=NablaParams(P=0.3, wT=1, wH=1, wW=1))
    assert torch.allclose(full, dense, atol=1e-5 * dense.abs().max())
    assert not torch.allclose(sparse, dense, atol=1e-3)
    with pytest.raises(ValueError, match="multiples of 8 .* 4 x 4 tokens \\(64 x 64 px\\)"):
        model(*random_inputs(model, 1, 1, 8, 8, 3), nabla=NablaParams(P=0.9))


def test_generation_with_the_nabla_task_and_its_options(tiny_tree, tmp_path):
    from .generation_helpers import generate

    vae, enc = (
        str(tiny_tree / "vae"),
        [
            "--text_encoder_qwen",
            str(tiny_tree / "text_encoder"),
            "--text_encoder_clip",
            str(tiny_tree / "text_encoder2"),
        ],
    )
    base = [
        "--dit",
        str(tiny_tree / "model/tiny_t2v.safetensors"),
        "--vae",
        vae,
        *enc,
        "--prompt",
        "x",
        "--steps",
        "2",
        "--frames",
        "5",
        "--dtype",
        "float32",
    ]
    import kandinsky5_generate_video

    kandinsky5_generate_video.main(["--task", "tiny-t2v-nabla", *base, "--output", str(tmp_path / "n.mp4")])
    assert (tmp_path / "n.mp4").exists()
    with pytest.raises(SystemExit, match="width must be a multiple of 128 .*NABLA"):
        generate(tiny_tree, "tiny-t2v", "--prompt", "x", "--force_nabla_attention", "--width", "64")
    dense = sampled_latent(tiny_tree, tmp_path, "dense", "--width", "128", "--height", "128")
    forced = sampled_latent(
        tiny_tree,
        tmp_path,
        "all",
        "--width",
        "128",
        "--height",
        "128",
        "--force_nabla_attention",
        "--nabla_P",
        "1",
        "--nabla_wT",
        "99",
        "--nabla_wH",
        "99",
        "--nabla_wW",
        "99",
    )
    assert torch.allclose(dense, forced, atol=1e-4)
