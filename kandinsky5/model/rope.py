"""Rotary position embeddings: 1-D for text tokens, 3-D (time, height, width) for video tokens.

The tables (complex64: fp32 cos and sin) are computed on the device that asks for them and kept in a
small cache keyed by shape; they are never module buffers, so casting the model
(``model.to(torch.bfloat16)``) cannot downcast them.
"""

from __future__ import annotations

import math

import torch

MAX_PERIOD = 10000.0


def frequencies(dim: int, device: torch.device | None = None) -> torch.Tensor:
    """exp(-ln(10000) * i / (dim/2)) for i < dim/2: the rotation speeds of ``dim`` channels."""
    half = dim // 2
    return torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=device) / half)


def _angles(positions: int, dim: int, scale: float, device: torch.device) -> torch.Tensor:
    pos = torch.arange(positions, dtype=torch.float32, device=device)
    return torch.outer(pos, frequencies(dim, device)) / scale


def text_angles(length: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """(length, head_dim/2) angles for text positions 0..length-1."""
    return _angles(length, head_dim, 1.0, device)


def visual_angles(
    grid: tuple[int, int, int], axes_dims: tuple[int, int, int], scale: tuple[float, float, float], device: torch.device
) -> torch.Tensor:
    """(T*H*W, head_dim/2) angles of a token grid in raster order; each axis has its own channels."""
    t, h, w = grid
    at, ah, aw = (_angles(n, d, s, device) for n, d, s in zip(grid, axes_dims, scale, strict=True))
    return torch.cat(
        [
            at[:, None, None].expand(t, h, w, -1),
            ah[None, :, None].expand(t, h, w, -1),
            aw[None, None, :].expand(t, h, w, -1),
        ],
        dim=-1,
    ).reshape(t * h * w, -1)


def rotation(angles: torch.Tensor) -> torch.Tensor:
    """cos + i sin of ``angles`` as complex64 shaped (tokens, 1, head_dim/2), to broadcast over
    (batch, tokens, heads, head_dim/2)."""
    return torch.complex(torch.cos(angles), torch.sin(angles))[:, None]


class RopeCache:
    """Rotation tables per (kind, shape, scale, device), recomputed only when one of those changes."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._tables: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple, make) -> torch.Tensor:
        if key not in self._tables:
            if len(self._tables) >= self.max_entries:
                self._tables.pop(next(iter(self._tables)))
            self._tables[key] = rotation(make())
        return self._tables[key]
