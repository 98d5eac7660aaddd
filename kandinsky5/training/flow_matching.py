"""The training objective: flow matching with the same time convention as the sampler (the
timesteps it is trained at: kandinsky5/training/timesteps.py).

x_t = (1 - t) x_0 + t * noise, the DiT sees time t * 1000 (as at inference), and learns the
velocity noise - x_0 with a mean squared error.
"""

from __future__ import annotations

import torch


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1 - t) x0 + t noise, with t per sample."""
    t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0)
    return (1.0 - t) * x0 + t * noise


def flow_matching_loss(
    prediction: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    frame_weight: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the predicted and the true velocity (noise - x0), in fp32; ``frame_weight`` (T,)
    leaves frames out (I2V's clean first frame, which generation overwrites); ``sample_weight`` (B,)
    weighs each sample's error (--weighting_scheme)."""
    error = (prediction.float() - (noise.float() - x0.float())).square()
    if sample_weight is not None:
        error = error * sample_weight.view(-1, *([1] * (error.ndim - 1))).to(error)
    if frame_weight is None:
        return error.mean()
    weights = frame_weight.view(1, -1, *([1] * (error.ndim - 2))).to(error)
    return (error * weights).sum() / (weights.sum() * error[:, :1].numel())
