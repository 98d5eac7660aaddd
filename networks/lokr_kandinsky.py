"""LoKr for the Kandinsky 5 DiT (``--network_module networks.lokr_kandinsky``): the weight change of
each targeted Linear is a Kronecker product, dW = kron(lokr_w1, lokr_w2) (times alpha / rank when
``lokr_w2`` is a low-rank product), as LyCORIS trains it and ComfyUI merges it.

The output and input sizes are each split into two factors (out = a * b, in = c * d; ``factor=N`` in
``--network_args`` caps the smaller one, default: the most square split): ``lokr_w1`` (a, c) is
whole, ``lokr_w2`` (b, d) is whole when ``--network_dim`` reaches half of max(b, d), else the product
``lokr_w2_a`` (b, rank) @ ``lokr_w2_b`` (rank, d). Training never builds dW: the input is viewed as
(c, d) and multiplied by w2 on one side and w1 on the other.

The layers, options and dropouts are LoRA's (networks/adapter_network.py); ``dropout`` acts on the
update and ``rank_dropout`` drops whole output features. Files hold ``lora_unet_<path>.lokr_w1``,
``.lokr_w2`` or ``.lokr_w2_a``/``.lokr_w2_b``, ``.alpha`` (and ``.dora_scale`` with ``dora_wd=True``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapter_module import AdapterModule, wide_linear
from .adapter_network import network_factory
from .network_args import ADAPTERS


def factorization(size: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = size and m <= n: the largest m up to sqrt(size) (and up to ``factor`` when
    positive), or (factor, size / factor) ordered when ``factor`` divides ``size``."""
    if factor > 0 and size % factor == 0:
        return min(factor, size // factor), max(factor, size // factor)
    limit = factor if factor > 0 else size
    m = max(d for d in range(1, math.isqrt(size) + 1) if size % d == 0 and d <= limit)
    return m, size // m


class LoKrModule(AdapterModule):
    kind = "LoKr"
    extra_args = ADAPTERS["networks.lokr_kandinsky"][1]

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float | None, factor: int = -1, **options):
        super().__init__(name, base, rank, alpha, **options)
        (self.out_a, self.out_b), (self.in_c, self.in_d) = (
            factorization(base.out_features, factor),
            factorization(base.in_features, factor),
        )
        self.lokr_w1 = nn.Parameter(torch.empty(self.out_a, self.in_c))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        self.low_rank = rank < max(self.out_b, self.in_d) / 2
        if self.low_rank:
            self.lokr_w2_a = nn.Parameter(torch.empty(self.out_b, rank))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, self.in_d))  # the change starts at zero
        else:
            self.lokr_w2 = nn.Parameter(torch.zeros(self.out_b, self.in_d))

    @property
    def scale(self) -> float:
        """alpha / rank with a low-rank w2; 1 with both factors whole (ComfyUI ignores alpha then)."""
        return float(self.alpha) / self.rank if self.low_rank else 1.0

    def w2(self) -> torch.Tensor:
        return self.lokr_w2_a @ self.lokr_w2_b if self.low_rank else self.lokr_w2

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self.lokr_w1.float(), self.w2().float()).mul_(self.scale)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        # kron(w1, w2) x: x as (c, d); (c, d) @ w2ᵀ is (c, b); w1 @ that is (a, b), the output's layout
        inner = wide_linear(x.reshape(*lead, self.in_c, self.in_d), self.w2())
        out = torch.matmul(self.lokr_w1, inner).reshape(*lead, self.out_features)
        return self.output_dropout(out.mul_(self.scale))

    @torch.no_grad()
    def scale_update(self, ratio: float) -> None:
        self.lokr_w1.mul_(ratio)


ADAPTER = LoKrModule  # the module class this network is made of


create_network = network_factory(LoKrModule)
