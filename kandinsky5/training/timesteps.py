"""Which timesteps training draws, and how much each one's loss counts.

The samplings and weighting schemes are musubi-tuner's (and through it SD3's and FLUX's), with t in
[0, 1] the noise fraction of x_t = (1 - t) x_0 + t noise:

- uniform: U(0, 1); sigmoid: sigmoid(sigmoid_scale * N(0, 1));
- shift: s t0 / (1 + (s - 1) t0), t0 = sigmoid(sigmoid_scale * N(0, 1)), s = --discrete_flow_shift;
- flux_shift / qwen_shift: shift with s = exp(mu), mu linear in the tokens per frame
  ((h/2) * (w/2) of the latent): FLUX's line through (256, 0.5) and (4096, 1.15), Qwen-Image's
  through (256, 0.5) and (8192, 0.9);
- logit_normal: sigmoid(N(logit_mean, logit_std)); logsnr: sigmoid(-L / 2), L ~ N(logit_mean, logit_std);
- qinglong_flux / qinglong_qwen: per sample, 80 % flux_shift (or qwen_shift), 7.5 % logsnr, 12.5 %
  logsnr with mean 5.36 and std 1;
- sigma: u from the weighting scheme's density (logit_normal: sigmoid(N(logit_mean, logit_std)),
  mode: 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u), else U(0, 1)) picks one of 1000 discrete sigmas
  (1 ... 1/1000, shifted by --discrete_flow_shift) within [min_timestep, max_timestep].

Except for sigma, a draw is then mapped linearly into [min_timestep, max_timestep] (on the 0-1000
scale), or with --preserve_distribution_shape redrawn until it falls inside. --num_timestep_buckets N
draws the uniform numbers behind each sampling stratified over N equal buckets (each bucket once
per N draws), turned into normal draws by the inverse CDF.

Loss weights (--weighting_scheme): sigma_sqrt: 1 / t^2; cosmap: 2 / (pi (1 - 2t + 2t^2)); otherwise 1.
"""

from __future__ import annotations

import math
import random

import torch

SAMPLINGS = (
    "sigma",
    "uniform",
    "sigmoid",
    "shift",
    "flux_shift",
    "qwen_shift",
    "logit_normal",
    "logsnr",
    "qinglong_flux",
    "qinglong_qwen",
)
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
TRAIN_STEPS = 1000
SHIFT_LINES = {"flux": ((256, 0.5), (4096, 1.15)), "qwen": ((256, 0.5), (8192, 0.9))}


def resolution_shift(model: str, height: int, width: int) -> float:
    """exp(mu) with mu on the model's line through (tokens, mu) at the latent's tokens per frame."""
    (x1, y1), (x2, y2) = SHIFT_LINES[model]
    tokens = (height // 2) * (width // 2)
    return math.exp(y1 + (y2 - y1) / (x2 - x1) * (tokens - x1))


class TimestepBuckets:
    """Stratified uniform numbers: the [0, 1) range cut into ``count`` buckets, each used once (in a
    shuffled order) before any is used again."""

    def __init__(self, count: int, seed: int):
        self.count, self.pool, self.random = count, [], random.Random(seed)

    def uniform(self, n: int) -> torch.Tensor:
        values = []
        for _ in range(n):
            if not self.pool:
                self.pool = list(range(self.count))
                self.random.shuffle(self.pool)
            bucket = self.pool.pop()
            values.append((bucket + self.random.random()) / self.count)
        return torch.tensor(values)


class _Draws:
    """The random numbers behind a sampling: the generator's, or inverse-CDF images of given uniforms."""

    def __init__(self, generator: torch.Generator | None, uniform: torch.Tensor | None):
        self.generator, self.given = generator, uniform

    def _clamped(self, n: int) -> torch.Tensor:
        return self.given[:n].clamp(1e-7, 1 - 1e-7)

    def rand(self, n: int) -> torch.Tensor:
        return self._clamped(n) if self.given is not None else torch.rand(n, generator=self.generator)

    def normal(self, n: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
        if self.given is not None:
            return mean + std * math.sqrt(2.0) * torch.erfinv(2.0 * self._clamped(n) - 1.0)
        return mean + std * torch.randn(n, generator=self.generator)


def _shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1.0 + (shift - 1.0) * t)


def _continuous(mode: str, n: int, draws: _Draws, options: dict, latent_hw: tuple[int, int]) -> torch.Tensor:
    if mode == "uniform":
        return draws.rand(n)
    if mode == "logit_normal":
        return torch.sigmoid(draws.normal(n, options["logit_mean"], options["logit_std"]))
    if mode == "logsnr":
        return torch.sigmoid(-draws.normal(n, options["logit_mean"], options["logit_std"]) / 2)
    if mode.startswith("qinglong"):
        model = mode.removeprefix("qinglong_")
        choice = torch.rand(n, generator=draws.generator)
        shift = _continuous(f"{model}_shift", n, draws, options, latent_hw)
        logsnr = torch.sigmoid(-draws.normal(n, options["logit_mean"], options["logit_std"]) / 2)
        high = torch.sigmoid(-draws.normal(n, 5.36, 1.0) / 2)
        return torch.where(choice < 0.80, shift, torch.where(choice < 0.875, logsnr, high))
    t = torch.sigmoid(options["sigmoid_scale"] * draws.normal(n))
    if mode == "shift":
        return _shifted(t, options["discrete_flow_shift"])
    if mode in ("flux_shift", "qwen_shift"):
        return _shifted(t, resolution_shift(mode.removesuffix("_shift"), *latent_hw))
    return t  # sigmoid


def _density(scheme: str, n: int, draws: _Draws, options: dict) -> torch.Tensor:
    if scheme == "logit_normal":
        return torch.sigmoid(draws.normal(n, options["logit_mean"], options["logit_std"]))
    u = draws.rand(n)
    if scheme == "mode":
        return 1.0 - u - options["mode_scale"] * (torch.cos(math.pi * u / 2) ** 2 - 1.0 + u)
    return u


def sample_timesteps(
    batch: int,
    mode: str,
    generator: torch.Generator | None = None,
    *,
    latent_hw: tuple[int, int] = (64, 64),
    weighting_scheme: str = "none",
    sigmoid_scale: float = 1.0,
    discrete_flow_shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    min_timestep: float = 0.0,
    max_timestep: float = 1000.0,
    preserve_distribution_shape: bool = False,
    buckets: TimestepBuckets | None = None,
) -> torch.Tensor:
    """t per sample (fp32) in [min_timestep/1000, max_timestep/1000]; see the module docstring."""
    if mode not in SAMPLINGS:
        raise ValueError(f"--timestep_sampling {mode!r}: expected one of {', '.join(SAMPLINGS)}")
    if not 0 <= min_timestep < max_timestep <= 1000:
        raise ValueError(f"need 0 <= --min_timestep < --max_timestep <= 1000, got {min_timestep} and {max_timestep}")
    options = dict(
        sigmoid_scale=sigmoid_scale,
        discrete_flow_shift=discrete_flow_shift,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
    )
    low, high = min_timestep / 1000.0, max_timestep / 1000.0

    def draws() -> _Draws:
        return _Draws(generator, buckets.uniform(batch) if buckets is not None else None)

    if mode == "sigma":
        u = _density(weighting_scheme, batch, draws(), options)
        first, last = TRAIN_STEPS - max_timestep, TRAIN_STEPS - min_timestep  # the sigmas run from 1 down
        index = (u * (last - first) + first).long().clamp(0, TRAIN_STEPS - 1)
        sigmas = 1.0 - index.float() / TRAIN_STEPS  # 1, 0.999, ..., 0.001
        return _shifted(sigmas, discrete_flow_shift)
    if not preserve_distribution_shape:
        return low + _continuous(mode, batch, draws(), options, latent_hw) * (high - low)
    kept: list[torch.Tensor] = []
    for _ in range(1000):  # redraw until enough fall inside the range, keeping the distribution's shape
        t = _continuous(mode, batch, draws(), options, latent_hw)
        kept += list(t[(t >= low) & (t <= high)])
        if len(kept) >= batch:
            return torch.stack(kept[:batch])
    raise ValueError(
        f"--preserve_distribution_shape: --timestep_sampling {mode} gives almost no timesteps in "
        f"[{min_timestep:g}, {max_timestep:g}]; widen the range"
    )


def loss_weights(scheme: str, t: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights of --weighting_scheme at noise fractions ``t``."""
    if scheme == "sigma_sqrt":
        return t.float().clamp(min=1e-6) ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * t.float() + 2.0 * t.float() ** 2))
    return torch.ones_like(t, dtype=torch.float32)
