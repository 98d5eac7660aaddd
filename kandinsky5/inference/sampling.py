"""The Kandinsky 5 time schedule and the Euler sampler.

The model is a flow-matching velocity predictor: x_sigma = (1 - sigma) x_0 + sigma * noise, and
the DiT predicts v = noise - x_0 at time sigma * 1000. Sampling integrates dx/dsigma = v from
sigma = 1 (noise) to 0 (data).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flow_schedule(steps: int, scheduler_scale: float, device: torch.device | str | None = None) -> torch.Tensor:
    """steps + 1 sigmas from 1 to 0: t = linspace(1, 0, steps + 1) warped by s = S t / (1 + (S - 1) t).

    A larger scheduler scale S spends more of the steps at high noise. (The official schedule; note
    that it differs from diffusers' FlowMatchEulerDiscreteScheduler with the same shift.)"""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32, device=device)
    return scheduler_scale * t / (1.0 + (scheduler_scale - 1.0) * t)


def sample_euler(
    velocity: Velocity,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Euler's method: x <- x + (sigma_next - sigma) * v(x, sigma) for each step; x stays fp32."""
    x = x.float()
    for i in range(len(sigmas) - 1):
        v = velocity(x, sigmas[i])
        x = x + (sigmas[i + 1] - sigmas[i]) * v.float()
        if callback is not None:
            callback(i, x)
    return x
