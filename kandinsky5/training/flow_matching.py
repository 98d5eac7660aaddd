"""The training objective: flow matching with the same time convention as the sampler.

x_t = (1 - t) x_0 + t * noise, the DiT sees time t * 1000 (as at inference), and learns the
velocity noise - x_0 with a mean squared error.
"""

from __future__ import annotations

import torch

TIMESTEP_SAMPLING = ("uniform", "sigmoid", "shift", "logit_normal")


def sample_timesteps(
    batch: int,
    mode: str,
    generator: torch.Generator | None = None,
    *,
    sigmoid_scale: float = 1.0,
    discrete_flow_shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    min_timestep: float = 0.0,
    max_timestep: float = 1000.0,
) -> torch.Tensor:
    """t in [min_timestep/1000, max_timestep/1000] per sample (fp32):

    - uniform: U(0, 1)
    - sigmoid: sigmoid(sigmoid_scale * N(0, 1))
    - shift: s t0 / (1 + (s - 1) t0) with t0 = sigmoid(sigmoid_scale * N(0, 1)), s = discrete_flow_shift
      (the warp the sampler's scheduler_scale applies: more weight on high noise for s > 1)
    - logit_normal: sigmoid(N(logit_mean, logit_std))

    The draw is then mapped linearly into the [min, max] range (both on the 0-1000 scale)."""
    if mode not in TIMESTEP_SAMPLING:
        raise ValueError(f"--timestep_sampling {mode!r}: expected one of {', '.join(TIMESTEP_SAMPLING)}")
    if not 0 <= min_timestep < max_timestep <= 1000:
        raise ValueError(f"need 0 <= --min_timestep < --max_timestep <= 1000, got {min_timestep} and {max_timestep}")
    normal = torch.randn(batch, generator=generator)
    if mode == "uniform":
        t = torch.rand(batch, generator=generator)
    elif mode == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * normal)
    else:
        t = torch.sigmoid(sigmoid_scale * normal)
        if mode == "shift":
            t = discrete_flow_shift * t / (1.0 + (discrete_flow_shift - 1.0) * t)
    return min_timestep / 1000.0 + t * (max_timestep - min_timestep) / 1000.0


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1 - t) x0 + t noise, with t per sample."""
    t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0)
    return (1.0 - t) * x0 + t * noise


def flow_matching_loss(
    prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, frame_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE between the predicted and the true velocity (noise - x0), in fp32; ``frame_weight`` (T,)
    leaves frames out (I2V's clean first frame, which generation overwrites)."""
    error = (prediction.float() - (noise.float() - x0.float())).square()
    if frame_weight is None:
        return error.mean()
    weights = frame_weight.view(1, -1, *([1] * (error.ndim - 2))).to(error)
    return (error * weights).sum() / (weights.sum() * error[:, :1].numel())
