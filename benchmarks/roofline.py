"""The matmul work of one DiT forward (and backward), counted from the shapes, and its roofline.

Every Linear layer and both attention products of every block are listed as matmul shapes
(m x k times k x n), each with the dtype the official numerics give it: the time embedding and the
modulations run in fp32, everything else in the compute dtype. The roofline is the time the same
shapes take as plain matmuls (torch.nn.functional.linear / torch.matmul) on this device, measured
in the same process as the model, each block's share right after that block (benchmarks/
interleaved.py), so that a busy machine slows both alike; a model's fraction of the roofline is
that time over its own. A model reads each layer's weight once, from memory; so does the roofline:
a shape that occurs n times runs n times over distinct weights (cycling through enough copies to
overflow the last-level cache), since one weight run again and again would stay in the cache and
give a roofline no model can reach. The backward of a frozen-weight (LoRA-style) pass adds the
input gradients on the latents' path (:func:`backward_parts`). The shapes come in parts (outside
the blocks, one text block, one visual block), so that benchmarks/interleaved.py can run each
block's share right after that block.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    m: int
    k: int
    n: int
    fp32: bool = False  # official numerics keep this layer in fp32
    heads: int = 0  # > 0: a batched attention product over this many heads

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * max(self.heads, 1)


def _dims(params: dict, batch: int) -> tuple[int, int, int, int, int, int]:
    """model_dim, ff_dim, time_dim, head_dim, batch x heads, and the latent channels the DiT takes."""
    d, head_dim = params["model_dim"], sum(params["axes_dims"])
    channels = 2 * params["in_visual_dim"] + 1 if params["visual_cond"] or params["instruct_type"] else 16
    return d, params["ff_dim"], params["time_dim"], head_dim, batch * (d // head_dim), channels


def forward_parts(params: dict, visual_tokens: int, text_tokens: int, batch: int = 1) -> dict[str, Counter]:
    """The matmuls of one forward with how often each occurs, in three parts: "outside the blocks"
    (embeddings, output layer), "text block" and "visual block" (each one block's)."""
    d, ff, time_dim, head_dim, batch_heads, channels = _dims(params, batch)
    v, t = batch * visual_tokens, batch * text_tokens
    outer, text, visual = Counter(), Counter(), Counter()
    outer[Shape(batch, d, time_dim, fp32=True)] += 1  # time embedding
    outer[Shape(batch, time_dim, time_dim, fp32=True)] += 1
    outer[Shape(batch, params["in_text_dim2"], time_dim)] += 1  # pooled text
    outer[Shape(t, params["in_text_dim"], d)] += 1  # text embedding
    outer[Shape(v, 4 * channels, d)] += 1  # patch embedding (patch 1x2x2)
    outer[Shape(batch, time_dim, 2 * d, fp32=True)] += 1
    outer[Shape(v, d, 4 * params["out_visual_dim"])] += 1
    text[Shape(batch, time_dim, 6 * d, fp32=True)] += 1
    text[Shape(t, d, d)] += 4
    text[Shape(t, d, ff)] += 1
    text[Shape(t, ff, d)] += 1
    text[Shape(text_tokens, head_dim, text_tokens, heads=batch_heads)] += 2
    visual[Shape(batch, time_dim, 9 * d, fp32=True)] += 1
    visual[Shape(v, d, d)] += 6  # self q, k, v, out; cross q, out
    visual[Shape(t, d, d)] += 2  # cross k, v
    visual[Shape(v, d, ff)] += 1
    visual[Shape(v, ff, d)] += 1
    visual[Shape(visual_tokens, head_dim, visual_tokens, heads=batch_heads)] += 2
    visual[Shape(visual_tokens, head_dim, text_tokens, heads=batch_heads)] += 2
    return {"outside the blocks": outer, "text block": text, "visual block": visual}


def backward_parts(params: dict, visual_tokens: int, text_tokens: int, batch: int = 1) -> dict[str, Counter]:
    """The matmuls of the backward of a forward with frozen weights in which only the latents need a
    gradient (the base model's work in a LoRA step): the input gradient of every Linear on the path
    from the latents to the output (not the text's, nor the time embedding's) and of the attention
    products on it (self-attention's four, cross-attention's two for the queries alone)."""
    d, ff, _, head_dim, batch_heads, channels = _dims(params, batch)
    v = batch * visual_tokens
    outer, visual = Counter(), Counter()
    outer[Shape(v, d, 4 * channels)] += 1  # patch embedding
    outer[Shape(v, 4 * params["out_visual_dim"], d)] += 1
    visual[Shape(v, d, d)] += 6  # self q, k, v, out; cross q, out
    visual[Shape(v, ff, d)] += 1
    visual[Shape(v, d, ff)] += 1
    visual[Shape(visual_tokens, head_dim, visual_tokens, heads=batch_heads)] += 4
    visual[Shape(visual_tokens, head_dim, text_tokens, heads=batch_heads)] += 2
    return {"outside the blocks": outer, "text block": Counter(), "visual block": visual}


def whole(parts: dict[str, Counter], params: dict) -> Counter:
    """The matmuls of all of a pass: the part outside the blocks once, each block's once per block."""
    shapes = Counter(parts["outside the blocks"])
    for _ in range(params["num_text_blocks"]):
        shapes.update(parts["text block"])
    for _ in range(params["num_visual_blocks"]):
        shapes.update(parts["visual block"])
    return shapes


def forward_shapes(params: dict, visual_tokens: int, text_tokens: int, batch: int = 1) -> Counter:
    """The matmuls of one forward, with how often each occurs."""
    return whole(forward_parts(params, visual_tokens, text_tokens, batch), params)


def backward_shapes(params: dict, visual_tokens: int, text_tokens: int, batch: int = 1) -> Counter:
    """The matmuls of the backward of :func:`backward_parts`, with how often each occurs."""
    return whole(backward_parts(params, visual_tokens, text_tokens, batch), params)


def total_flops(shapes: Counter) -> int:
    return sum(shape.flops * count for shape, count in shapes.items())


CACHE_BYTES = 128 * 2**20  # more weights than any last-level cache holds


def roofline_pass(shapes: Counter, dtype: torch.dtype, device: str) -> Callable[[], None]:
    """A function that runs every matmul of ``shapes`` once, as plain matmuls on ``device``: the
    attention products on fresh activations, each Linear shape over distinct weights (cycling
    through copies enough to overflow the last-level cache)."""
    g = torch.Generator().manual_seed(0)
    work = []
    for shape, count in shapes.items():
        kind = torch.float32 if shape.fp32 else dtype
        if shape.heads:
            a = torch.randn(shape.heads, shape.m, shape.k, generator=g).to(device, kind)
            b = torch.randn(shape.heads, shape.k, shape.n, generator=g).to(device, kind)
            work += [(torch.matmul, a, [b], count)]
            continue
        a = torch.randn(shape.m, shape.k, generator=g).to(device, kind)
        copies = min(count, -(-CACHE_BYTES // (shape.n * shape.k * torch.finfo(kind).bits // 8)))
        weights = [torch.randn(shape.n, shape.k, generator=g).to(device, kind) for _ in range(copies)]
        work += [(F.linear, a, weights, count)]

    def run() -> None:
        for function, a, operands, count in work:
            for i in range(count):
                function(a, operands[i % len(operands)])

    return run
