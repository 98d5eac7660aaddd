"""NABLA: block-sparse self-attention for the visual tokens of the long and HD tasks.

Tokens are put in "fractal" order: each frame's (H/2) x (W/2) token grid is cut into 8 x 8 tiles, and
a tile's 64 tokens are consecutive, so attention can work on 64-token blocks. For each head, the
block map keeps, for every query block, the key blocks holding a fraction P of its attention mass
(estimated from the blocks' mean queries and keys: softmax over key blocks, sorted, cumulative sum
>= 1 - P), plus a local window (STA: within wT frames and wH x wW tiles) when add_sta. Attention then
runs over the kept blocks only.

On CUDA the kept blocks run in a compiled flex_attention kernel. Elsewhere (PyTorch's CPU compiler
cannot build flex_attention here) the query blocks are taken a chunk at a time, against the key
blocks the chunk keeps, gathered, with the block map as mask: the same result, with work and memory
that grow with the kept blocks too.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cache

import torch
import torch.nn.functional as F

from kandinsky5.model.tasks import NablaParams, TaskPreset

TILE = 8  # tokens per tile side
BLOCK = TILE * TILE


def check_grid(grid: tuple[int, int, int]) -> None:
    t, h, w = grid
    if h % TILE or w % TILE:
        raise ValueError(
            f"NABLA attention needs a token grid in multiples of {TILE} (frame sides in multiples of "
            f"128 px); this one is {h} x {w} tokens ({h * 16} x {w * 16} px)"
        )


def fractal_order(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, T*H*W, ...) raster order -> (B, T*H*W, ...) with each 8x8 tile's tokens consecutive."""
    t, h, w = grid
    rest = x.shape[2:]
    x = x.reshape(x.shape[0], t, h // TILE, TILE, w // TILE, TILE, *rest)
    x = x.permute(0, 1, 2, 4, 3, 5, *range(6, 6 + len(rest)))
    return x.reshape(x.shape[0], t * h * w, *rest)


def raster_order(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of fractal_order."""
    t, h, w = grid
    rest = x.shape[2:]
    x = x.reshape(x.shape[0], t, h // TILE, w // TILE, TILE, TILE, *rest)
    x = x.permute(0, 1, 2, 4, 3, 5, *range(6, 6 + len(rest)))
    return x.reshape(x.shape[0], t * h * w, *rest)


@cache
def sta_mask(t: int, hb: int, wb: int, wT: int, wH: int, wW: int, device: str = "cpu") -> torch.Tensor:
    """(N, N) bool over the N = t*hb*wb tiles: tile (t, h, w) sees (t', h', w') within half the window."""
    pos = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(hb), torch.arange(wb), indexing="ij"), -1)
    pos = pos.reshape(-1, 3).to(device)
    distance = (pos[:, None] - pos[None]).abs()
    return (distance[..., 0] <= wT // 2) & (distance[..., 1] <= wH // 2) & (distance[..., 2] <= wW // 2)


def block_map(q: torch.Tensor, k: torch.Tensor, sta: torch.Tensor, config: NablaParams) -> torch.Tensor:
    """(B, H, N, N) bool of the key blocks each query block attends to; q, k are (B, S, H, D) in fractal order."""
    b, s, heads, d = q.shape
    qa = q.float().reshape(b, s // BLOCK, BLOCK, heads, d).mean(2).transpose(1, 2)
    ka = k.float().reshape(b, s // BLOCK, BLOCK, heads, d).mean(2).transpose(1, 2)
    scores = torch.softmax(qa @ ka.transpose(-1, -2) / math.sqrt(d), dim=-1)
    if config.method == "topk":
        keep = max(1, math.ceil(config.P * scores.shape[-1]))
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(keep, dim=-1).indices, True)
    else:
        values, order = scores.sort(dim=-1)
        kept_sorted = values.cumsum(dim=-1) >= 1.0 - config.P
        mask = torch.zeros_like(kept_sorted).scatter_(-1, order, kept_sorted)
    return mask | sta if config.add_sta else mask


def dense_masked_attention(q, k, v, blocks: torch.Tensor) -> torch.Tensor:
    """Exactly what the block-sparse kernels compute, as dense attention with a token mask (the
    definition the tests hold the kernels to; dense memory)."""
    tokens = blocks.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=tokens)
    return out.transpose(1, 2)


GATHER_CHUNK_BYTES = 64 * 2**20  # the token mask of one chunk of query blocks


def gathered_block_attention(q, k, v, blocks: torch.Tensor) -> torch.Tensor:
    """Block-sparse attention without a compiled kernel (any device). The query blocks are taken a
    chunk at a time; the chunk attends to the key blocks that any of its query blocks keeps (for
    the tiles of neighbouring frame regions, mostly the same ones), gathered into one key sequence,
    with the block map as mask. Work and memory grow with the kept blocks, not with tokens squared."""
    b, s, heads, d = q.shape
    n = s // BLOCK
    step = max(1, GATHER_CHUNK_BYTES // (b * heads * BLOCK * BLOCK * n))
    offsets = torch.arange(BLOCK, device=q.device)
    out = torch.empty_like(q)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        kept = blocks[:, :, rows]  # (B, H, C, N)
        union = kept.any(dim=2).any(dim=1).any(dim=0).nonzero()[:, 0]  # key blocks the chunk needs
        tokens = (union[:, None] * BLOCK + offsets).flatten()
        mask = kept[..., union].repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
        queries = q[:, start * BLOCK : rows.stop * BLOCK].transpose(1, 2)
        keys, values = k[:, tokens].transpose(1, 2), v[:, tokens].transpose(1, 2)
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
        out[:, start * BLOCK : rows.stop * BLOCK] = attended.transpose(1, 2)
    return out


@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(blocks: torch.Tensor, mask_mod=None):
    """A flex_attention BlockMask in which each query block has exactly its kept key blocks, all full."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = blocks.sum(-1).to(torch.int32)
    indices = blocks.to(torch.int32).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(
        torch.zeros_like(counts), indices, counts, indices, BLOCK_SIZE=BLOCK, mask_mod=mask_mod
    )


def flex_block_attention(q, k, v, blocks: torch.Tensor) -> torch.Tensor:
    """Block-sparse attention in a compiled flex_attention kernel (CUDA): only kept blocks are computed."""
    mask = flex_block_mask(blocks)
    out = _compiled_flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)
    return out.transpose(1, 2)


def nabla_attention(q, k, v, grid: tuple[int, int, int], config: NablaParams) -> torch.Tensor:
    """Self-attention of fractal-ordered visual tokens, (B, S, H, D) in and out."""
    t, h, w = grid
    sta = sta_mask(t, h // TILE, w // TILE, config.wT, config.wH, config.wW, str(q.device))
    blocks = block_map(q, k, sta, config)
    if q.device.type == "cuda":
        return flex_block_attention(q, k, v, blocks)
    return gathered_block_attention(q, k, v, blocks)


def nabla_params(options, task: TaskPreset) -> NablaParams | None:
    """The task's NABLA parameters (or defaults with --force_nabla_attention) with the scripts' options
    (``nabla_P``, ``nabla_wT``, ...) applied; None for a dense task."""
    base = task.nabla or (NablaParams(P=0.9) if getattr(options, "force_nabla_attention", False) else None)
    if base is None:
        return None
    changes = {field: getattr(options, f"nabla_{field}", None) for field in ("P", "wT", "wH", "wW", "method")}
    changes = {k: v for k, v in changes.items() if v is not None}
    if getattr(options, "no_nabla_add_sta", False):
        changes["add_sta"] = False
    return dataclasses.replace(base, **changes)
