import pytest
import torch

from kandinsky5.inference.denoiser import Denoiser, TextCondition, i2v_channels, t2v_channels
from kandinsky5.inference.sampling import flow_schedule, sample_euler

from .dit_helpers import random_dit


def text(length, seed, dim=32):
    g = torch.Generator().manual_seed(seed)
    return TextCondition(
        torch.randn(1, length, dim, generator=g),
        torch.ones(1, length, dtype=torch.bool),
        torch.randn(1, dim, generator=g),
    )


@pytest.mark.parametrize("scale,steps,last", [(10.0, 50, 0.1695), (5.0, 16, 0.25), (3.0, 50, 0.0577)])
def test_schedule_matches_the_official_values(scale, steps, last):
    sigmas = flow_schedule(steps, scale)
    assert sigmas.shape == (steps + 1,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert abs(sigmas[-2].item() - last) < 5e-4
    assert (sigmas[1:] < sigmas[:-1]).all()


def official_loop(dit, noise, cond, uncond, guidance, scale, steps, rope, image_latent=None):
    """The official sampling loop written out from its formulas, one sample, two passes per step."""
    t = torch.linspace(1, 0, steps + 1)
    s = scale * t / (1 + (scale - 1) * t)
    img = noise.clone()
    b, frames, h, w, _ = img.shape
    extra = torch.zeros(b, frames, h, w, 17)
    if image_latent is not None:
        extra[:, 0, :, :, 16] = 1
    for i in range(steps):
        if image_latent is not None:
            img[:, :1] = image_latent
        x = torch.cat([img, extra], dim=-1)
        time = s[i : i + 1] * 1000
        v_c = dit(x, cond.embeddings, cond.pooled, time, rope_scale=rope)
        v_u = dit(x, uncond.embeddings, uncond.pooled, time, rope_scale=rope) if guidance != 1 else v_c
        v = v_u + guidance * (v_c - v_u)
        img = img + (s[i + 1] - s[i]) * v
    if image_latent is not None:
        img[:, :1] = image_latent
        for f in range(4):  # first-frame normalisation towards frames 4..8
            src, ref = img[0, f].clone(), img[0, 4 : 4 + min(5, frames - 1)]
            mean, std = src.mean(), src.std()
            target_mean = torch.clamp(ref.mean(), mean - 0.05, mean + 0.10)
            target_std = torch.clamp(ref.std(), std - 0.10, std + 0.25)
            img[0, f] = (src - mean) / std * target_std + target_mean
    return img


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_t2v_sampler_equals_the_official_loop(batched, guidance):
    dit = random_dit("tiny-t2v")
    cond, uncond = text(7, 1), text(3, 2)
    noise = torch.randn(1, 3, 4, 6, 16, generator=torch.Generator().manual_seed(0))
    denoiser = Denoiser(dit, cond, uncond, guidance, (1, 2, 2), t2v_channels((1, 3, 4, 6), "cpu"), batched_cfg=batched)
    with torch.no_grad():
        ours = denoiser.finish(sample_euler(denoiser, noise, flow_schedule(5, 10.0)))
        reference = official_loop(dit, noise, cond, uncond, guidance, 10.0, 5, (1, 2, 2))
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-5 * reference.abs().max())


def test_i2v_sampler_equals_the_official_loop():
    dit = random_dit("tiny-i2v")
    cond, uncond = text(5, 3), text(9, 4)
    g = torch.Generator().manual_seed(1)
    noise, image_latent = torch.randn(1, 6, 4, 4, 16, generator=g), torch.randn(1, 1, 4, 4, 16, generator=g)
    denoiser = Denoiser(dit, cond, uncond, 4.0, (1, 2, 2), i2v_channels((1, 6, 4, 4), "cpu"), image_latent)
    with torch.no_grad():
        ours = denoiser.finish(sample_euler(denoiser, noise, flow_schedule(4, 5.0)))
        reference = official_loop(dit, noise, cond, uncond, 4.0, 5.0, 4, (1, 2, 2), image_latent)
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-5 * reference.abs().max())


def test_guidance_one_runs_one_pass_per_step():
    dit = random_dit("tiny-t2v")
    calls = []
    dit.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    denoiser = Denoiser(dit, text(4, 1), None, 1.0, (1, 2, 2), t2v_channels((1, 1, 4, 4), "cpu"))
    with torch.no_grad():
        sample_euler(denoiser, torch.randn(1, 1, 4, 4, 16), flow_schedule(3, 5.0))
    assert calls == [1, 1, 1]
    calls.clear()
    denoiser = Denoiser(dit, text(4, 1), text(2, 2), 3.0, (1, 2, 2), t2v_channels((1, 1, 4, 4), "cpu"))
    with torch.no_grad():
        sample_euler(denoiser, torch.randn(1, 1, 4, 4, 16), flow_schedule(3, 5.0))
    assert calls == [2, 2, 2]  # cond and uncond as one batch
