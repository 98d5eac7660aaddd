"""The matmul work of one DiT forward (and backward), counted from the shapes, and its roofline.

Every Linear layer and both attention products of every block are listed as matmul shapes
(m x k times k x n), each with the dtype the official numerics give it: the time embedding and the
modulations run in fp32, everything else in the compute dtype. The roofline is the time the same
shapes take as plain matmuls (torch.nn.functional.linear / torch.matmul) on this device, measured
in the same process, its runs alternating with the model's, so that a busy machine slows both alike;
a model's fraction of the roofline is that time over its own. A model reads each
layer's weight once, from memory; so does the roofline: a shape that occurs n times runs n times
over distinct weights (cycling through enough copies to overflow the last-level cache), since one
weight run again and again would stay in the cache and give a roofline no model can reach. The backward of a
frozen-weight (LoRA-style) pass adds, per Linear, the input gradient (m x n times n x k) and, per
attention, four products the size of the forward's two.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modules.wide_matmul import wide_cpu_matmuls


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


def forward_shapes(params: dict, visual_tokens: int, text_tokens: int, batch: int = 1) -> Counter:
    """The matmuls of one forward, with how often each occurs."""
    d, ff, time_dim = params["model_dim"], params["ff_dim"], params["time_dim"]
    heads, head_dim = d // sum(params["axes_dims"]), sum(params["axes_dims"])
    channels = 2 * params["in_visual_dim"] + 1 if params["visual_cond"] or params["instruct_type"] else 16
    v, t = batch * visual_tokens, batch * text_tokens
    shapes: Counter = Counter()
    shapes[Shape(batch, d, time_dim, fp32=True)] += 1  # time embedding
    shapes[Shape(batch, time_dim, time_dim, fp32=True)] += 1
    shapes[Shape(batch, params["in_text_dim2"], time_dim)] += 1  # pooled text
    shapes[Shape(t, params["in_text_dim"], d)] += 1  # text embedding
    shapes[Shape(v, 4 * channels, d)] += 1  # patch embedding (patch 1x2x2)
    for _ in range(params["num_text_blocks"]):
        shapes[Shape(batch, time_dim, 6 * d, fp32=True)] += 1
        shapes[Shape(t, d, d)] += 4
        shapes[Shape(t, d, ff)] += 1
        shapes[Shape(t, ff, d)] += 1
        shapes[Shape(text_tokens, head_dim, text_tokens, heads=batch * heads)] += 2
    for _ in range(params["num_visual_blocks"]):
        shapes[Shape(batch, time_dim, 9 * d, fp32=True)] += 1
        shapes[Shape(v, d, d)] += 6  # self q, k, v, out; cross q, out
        shapes[Shape(t, d, d)] += 2  # cross k, v
        shapes[Shape(v, d, ff)] += 1
        shapes[Shape(v, ff, d)] += 1
        shapes[Shape(visual_tokens, head_dim, visual_tokens, heads=batch * heads)] += 2
        shapes[Shape(visual_tokens, head_dim, text_tokens, heads=batch * heads)] += 2
    shapes[Shape(batch, time_dim, 2 * d, fp32=True)] += 1
    shapes[Shape(v, d, 4 * params["out_visual_dim"])] += 1
    return shapes


def backward_shapes(forward: Counter) -> Counter:
    """Input gradients with frozen weights: each Linear once more transposed, each attention product twice."""
    shapes: Counter = Counter()
    for shape, count in forward.items():
        if shape.heads:
            shapes[shape] += 2 * count
        elif not shape.fp32:  # the fp32 layers see only the time embedding, which needs no gradient
            shapes[Shape(shape.m, shape.n, shape.k)] += count
    return shapes


def total_flops(shapes: Counter) -> int:
    return sum(shape.flops * count for shape, count in shapes.items())


CACHE_BYTES = 128 * 2**20  # more weights than any last-level cache holds


def roofline_pass(shapes: Counter, dtype: torch.dtype, device: str) -> Callable[[], None]:
    """A function that runs every matmul of ``shapes`` once, as plain matmuls on ``device``: the
    attention products on fresh activations, each Linear shape over distinct weights (cycling
    through copies enough to overflow the last-level cache)."""
    g = torch.Generator().manual_seed(0)
    work = []
    # On a CPU without native bf16 kernels the fastest plain matmul of bf16 operands is the fp32 GEMM
    # (modules/wide_matmul.py): the roofline runs those shapes in fp32, over fp32 weights that need no
    # widening, so it stays a bound no model with bf16 weights can beat.
    reduced = torch.float32 if device == "cpu" and wide_cpu_matmuls(dtype) else dtype
    for shape, count in shapes.items():
        kind = torch.float32 if shape.fp32 else reduced
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
