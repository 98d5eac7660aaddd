"""LoHa for the Kandinsky 5 DiT (``--network_module networks.loha_kandinsky``): the weight change of
each targeted Linear is the Hadamard (element-wise) product of two rank-r products,
dW = (alpha / rank) * (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b), which can reach rank r².

The layers, options and dropouts are LoRA's (networks/adapter_network.py); ``dropout`` acts on the
update and ``rank_dropout`` drops whole output features. Files hold LyCORIS's keys under kohya names,
``lora_unet_<path>.hada_w1_a`` (out, r), ``.hada_w1_b`` (r, in), ``.hada_w2_a``, ``.hada_w2_b`` and
``.alpha`` (and ``.dora_scale`` with ``dora_wd=True``), which ComfyUI and LyCORIS load.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter_module import AdapterModule, wide_linear
from .adapter_network import network_factory


class LoHaModule(AdapterModule):
    kind = "LoHa"

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float | None, **options):
        super().__init__(name, base, rank, alpha, **options)
        out_features, in_features = base.out_features, base.in_features
        self.hada_w1_a = nn.Parameter(torch.randn(out_features, rank) * 0.1)
        self.hada_w1_b = nn.Parameter(torch.randn(rank, in_features))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_features, rank))  # the change starts at zero
        self.hada_w2_b = nn.Parameter(torch.randn(rank, in_features))

    def delta_weight(self) -> torch.Tensor:
        first = self.hada_w1_a.float() @ self.hada_w1_b.float()
        return (first * (self.hada_w2_a.float() @ self.hada_w2_b.float())).mul_(self.scale)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dropout(wide_linear(x, self.delta_weight()))

    @torch.no_grad()
    def scale_update(self, ratio: float) -> None:
        self.hada_w1_a.mul_(ratio**0.5)
        self.hada_w2_a.mul_(ratio**0.5)


ADAPTER = LoHaModule  # the module class this network is made of


create_network = network_factory(LoHaModule)
