"""Post-hoc EMA: one file averaged from the files a run saved along the way (per step or epoch).

The files are taken in training order (their ``ss_steps`` metadata, or their modification times when
a file lacks it), and averaged tensor by tensor in fp32, the first file being the start:
ema_1 = w_1, ema_k = beta_k * ema_(k-1) + (1 - beta_k) * w_k.

- ``beta``: beta_k = beta for every file; with ``beta2`` beta_k goes linearly from beta (k = 2) to beta2
  (k = n), as musubi-tuner's post-hoc tool does.
- ``sigma_rel``: the power-function EMA of Karras et al. (EDM2) with the files as its samples:
  beta_k = (1 - 1/k) ** (gamma + 1), gamma the root of sigma_rel² = (gamma + 1) / ((gamma + 2)² (gamma + 3)),
  which weighs file k by about k ** gamma (0.05 to 0.3 are usual; larger keeps more of the early files).

Tensors that are not floating point (none in our files) are the first file's; the metadata is the
last file's, with the method recorded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open


class PostHocEmaError(ValueError):
    pass


def gamma_of(sigma_rel: float) -> float:
    """The power-function exponent with relative width ``sigma_rel``: the largest real root of
    gamma³ + 7 gamma² + (16 - s) gamma + (12 - s) = 0, s = sigma_rel⁻²."""
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def betas(count: int, beta: float = 0.95, beta2: float | None = None, sigma_rel: float | None = None) -> list[float]:
    """beta_k for files k = 2..count (the first file is the start)."""
    if sigma_rel is not None:
        gamma = gamma_of(sigma_rel)
        return [(1.0 - 1.0 / k) ** (gamma + 1.0) for k in range(2, count + 1)]
    if beta2 is None or count <= 2:
        return [beta] * (count - 1)
    return [beta + (beta2 - beta) * i / (count - 2) for i in range(count - 1)]


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as error:
        raise PostHocEmaError(f"cannot read {path}: {error}") from None


def training_order(paths: list[Path]) -> list[Path]:
    """The files by their ``ss_steps`` (all must have it), else by modification time."""
    steps = {}
    for path in paths:
        if not path.is_file():
            raise PostHocEmaError(f"{path} is not a file")
        steps[path] = _read(path)[1].get("ss_steps")
    if all(s is not None and s.isdigit() for s in steps.values()):
        return sorted(paths, key=lambda p: int(steps[p]))
    return sorted(paths, key=os.path.getmtime)


def post_hoc_ema(paths: list[Path], beta: float = 0.95, beta2: float | None = None, sigma_rel: float | None = None):
    """(tensors, metadata) of the average of ``paths`` (at least two, from one run, already in order)."""
    if len(paths) < 2:
        raise PostHocEmaError("post-hoc EMA needs at least two files of one run")
    average, metadata = _read(paths[0])
    dtypes = {k: t.dtype for k, t in average.items()}
    average = {k: t.float() if t.is_floating_point() else t for k, t in average.items()}
    for path, beta_k in zip(paths[1:], betas(len(paths), beta, beta2, sigma_rel), strict=True):
        tensors, metadata = _read(path)
        if set(tensors) != set(average):
            other = sorted(set(tensors) ^ set(average))
            raise PostHocEmaError(f"{path} does not hold the same tensors as {paths[0]} (for example {other[0]!r})")
        for key, tensor in tensors.items():
            if tensor.shape != average[key].shape:
                raise PostHocEmaError(f"{path}: {key} is {list(tensor.shape)}, {list(average[key].shape)} before")
            if tensor.is_floating_point():
                average[key].lerp_(tensor.float(), 1.0 - beta_k)
    method = f"sigma_rel {sigma_rel}" if sigma_rel is not None else f"beta {beta}" + (
        f" to {beta2}" if beta2 is not None else "")  # fmt: skip
    metadata = {**metadata, "ss_post_hoc_ema": f"{method} over {len(paths)} files"}
    return {k: t.to(dtypes[k]) for k, t in average.items()}, metadata
