"""LoRA for the Kandinsky 5 DiT: the trainable network, saved in kohya format.

Targets (as the official and musubi-tuner LoRAs): in every text block ``self_attention.{to_query,
to_key, to_value, out_layer}`` and ``feed_forward.{in_layer, out_layer}``; in every visual block the
same plus ``cross_attention.*``: 6 and 10 Linear layers. Modulations, embeddings and the output
layer are never targeted. ``network_args`` can narrow or widen this with regular expressions
(``include_patterns=[...]``, ``exclude_patterns=[...]``, matched against the dotted module path).

Each targeted Linear keeps its own weights; its forward becomes
``y = W x + b + (alpha / rank) * up(dropout(down(x)))``, with ``up`` zero at the start.
Files hold ``lora_unet_<path with _>.lora_down.weight`` (rank, in), ``.lora_up.weight`` (out, rank)
and ``.alpha``, which ComfyUI and musubi-tuner load unchanged; with ``dora_wd=True`` (DoRA, see
networks/adapter_module.py) also ``.dora_scale`` (1, in), as LyCORIS writes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_module import AdapterModule, wide_linear
from .adapter_network import DEFAULT_INCLUDE, AdapterNetwork, network_factory
from .network_args import ADAPTERS

__all__ = ["DEFAULT_INCLUDE", "AdapterNetwork", "LoRAModule", "LoRANetwork", "create_network"]
LoRANetwork = AdapterNetwork  # the name scripts written for earlier versions import


class LoRAModule(AdapterModule):
    """The low-rank update of one Linear layer."""

    kind = "LoRA"
    extra_args = ADAPTERS["networks.lora_kandinsky"][1]

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float | None, **options):
        super().__init__(name, base, rank, alpha, **options)
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        hidden = wide_linear(x, self.lora_down.weight)
        scale = self.scale
        if self.training and self.dropout:
            hidden = F.dropout(hidden, p=self.dropout)
        if self.training and self.rank_dropout:
            keep = torch.rand(hidden.shape[:-1] + (self.rank,), device=hidden.device) > self.rank_dropout
            hidden, scale = hidden * keep.to(hidden.dtype), scale / (1.0 - self.rank_dropout)
        return self.lora_up(hidden).mul_(scale)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_up.weight.float() @ self.lora_down.weight.float())

    @torch.no_grad()
    def scale_update(self, ratio: float) -> None:
        self.lora_up.weight.mul_(ratio**0.5)
        self.lora_down.weight.mul_(ratio**0.5)


ADAPTER = LoRAModule  # the module class this network is made of


create_network = network_factory(LoRAModule)
