"""The DiT as a velocity function for the sampler: text conditioning, classifier-free guidance
and the image conditioning of I2V and I2I, built around the model so the sampler needs none of it.

Conditioning channels (what the DiT reads after the 16 latent channels, for models that take 33):

    T2V:  zeros (16)                 + zeros mask
    I2V:  zeros (16)                 + mask 1 on frame 0; frame 0 of the latent is the clean image
    I2I:  the source image's latent  + mask of ones
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kandinsky5.inference.magcache import MagCache
from kandinsky5.model.dit import DiffusionTransformer3D

CFG_EPSILON = 1e-6  # guidance within this of 1 means no unconditional pass, as the official code


@dataclass
class TextCondition:
    embeddings: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L) bool
    pooled: torch.Tensor  # (B, D2)


def stack_conditions(a: TextCondition, b: TextCondition) -> TextCondition:
    """One batch of both (right-padding the shorter text), for a single forward of cond and uncond."""
    length = max(a.embeddings.shape[1], b.embeddings.shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, length - t.shape[1]))

    return TextCondition(
        torch.cat([pad(a.embeddings), pad(b.embeddings)]),
        torch.cat([pad(a.mask), pad(b.mask)]),
        torch.cat([a.pooled, b.pooled]),
    )


def t2v_channels(shape: tuple[int, int, int, int], device) -> torch.Tensor:
    b, t, h, w = shape
    return torch.zeros(b, t, h, w, 17, device=device)


def i2v_channels(shape: tuple[int, int, int, int], device, first_frame: torch.Tensor | None = None) -> torch.Tensor:
    """The mask marks frame 0; its 16 latent channels stay zero (the official convention) unless
    ``first_frame`` (B, 1, H, W, 16) is given for a checkpoint made with it there (TaskPreset.image_in_condition)."""
    channels = t2v_channels(shape, device)
    channels[:, 0, ..., 16] = 1.0
    if first_frame is not None:
        channels[:, :1, ..., :16] = first_frame.to(device, channels.dtype)
    return channels


def with_last_frame(channels: torch.Tensor, last_frame: torch.Tensor) -> torch.Tensor:
    """First+last-frame I2V: the last frame's latent (B, 1, H, W, 16) in the conditioning channels of the
    last latent frame, its mask set (musubi-tuner's first_last layout). The first frame keeps the
    official I2V convention (the noisy latent's frame 0 replaced, the mask of frame 0 set)."""
    channels = channels.clone()
    channels[:, -1:, ..., :16] = last_frame.to(channels.dtype)
    channels[:, -1, ..., 16] = 1.0
    return channels


def i2i_channels(source_latent: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W, 16) source latent -> (B, 1, H, W, 17) with a mask of ones."""
    return torch.cat([source_latent, torch.ones_like(source_latent[..., :1])], dim=-1)


class Denoiser:
    """v(x, sigma) with everything that stays fixed over a sampling run."""

    def __init__(
        self,
        dit: DiffusionTransformer3D,
        cond: TextCondition,
        uncond: TextCondition | None,
        guidance: float,
        rope_scale: tuple[float, float, float],
        channels: torch.Tensor | None = None,
        first_frame: torch.Tensor | None = None,
        batched_cfg: bool = True,
        nabla=None,
        magcache: MagCache | None = None,
    ):
        self.dit, self.guidance, self.rope_scale, self.nabla = dit, guidance, rope_scale, nabla
        self.magcache = magcache
        self.channels, self.first_frame = channels, first_frame
        self.use_cfg = abs(guidance - 1.0) > CFG_EPSILON
        if self.use_cfg and uncond is None:
            raise ValueError("guidance != 1 needs an unconditional (negative prompt) condition")
        self.cond, self.uncond = cond, uncond
        self.both = stack_conditions(cond, uncond) if self.use_cfg and batched_cfg else None

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.first_frame is not None:
            x = torch.cat([self.first_frame.to(x.dtype), x[:, 1:]], dim=1)
        if self.channels is not None:
            x = torch.cat([x, self.channels.to(x.dtype)], dim=-1)
        return x

    def _run(self, x: torch.Tensor, sigma: torch.Tensor, text: TextCondition, streams) -> torch.Tensor:
        """One DiT pass; ``streams`` names the guidance pass (0 cond, 1 uncond) of each slice of the batch."""
        time = (sigma.float() * 1000.0).reshape(1).expand(x.shape[0])
        hook = None if self.magcache is None else self.magcache.hook(streams)
        out = self.dit(
            x,
            text.embeddings,
            text.pooled,
            time,
            text_mask=text.mask,
            rope_scale=self.rope_scale,
            nabla=self.nabla,
            visual_blocks_hook=hook,
        )
        return out.float()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.magcache is not None:
            self.magcache.next_step()
        x_in, whole = self.model_input(x), slice(None)
        if not self.use_cfg:
            return self._run(x_in, sigma, self.cond, [(0, whole)])
        if self.both is not None:
            b = x_in.shape[0]
            halves = [(0, slice(0, b)), (1, slice(b, 2 * b))]
            v_cond, v_uncond = self._run(torch.cat([x_in, x_in]), sigma, self.both, halves).chunk(2)
        else:
            v_cond = self._run(x_in, sigma, self.cond, [(0, whole)])
            v_uncond = self._run(x_in, sigma, self.uncond, [(1, whole)])
        return v_uncond + self.guidance * (v_cond - v_uncond)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The sampled latent with I2V's clean first frame put back (the Euler steps moved it)."""
        if self.first_frame is None:
            return x
        return normalize_first_frames(torch.cat([self.first_frame.float(), x[:, 1:]], dim=1))


def normalize_first_frames(latents: torch.Tensor) -> torch.Tensor:
    """The official I2V post-processing: pull the statistics of latent frames 0-3 towards those of
    frames 4-8, each source frame on its own (mean within -0.05/+0.10, std within -0.10/+0.25).
    Clips of 4 latent frames or fewer have no reference frames and are returned unchanged."""
    t = latents.shape[1]
    if t <= 4:
        return latents
    out = latents.clone()
    for b in range(latents.shape[0]):
        ref = latents[b, 4 : 4 + min(5, t - 1)]
        ref_mean, ref_std = ref.mean(), ref.std()
        for f in range(4):
            src = latents[b, f]
            mean, std = src.mean(), src.std()
            target_mean = ref_mean.clamp(mean - 0.05, mean + 0.10)
            target_std = ref_std.clamp(std - 0.10, std + 0.25)
            out[b, f] = (src - mean) / std * target_std + target_mean
    return out
