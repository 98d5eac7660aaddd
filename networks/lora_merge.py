"""Merge LoRAs into a model's Linear weights: W <- W + multiplier * (alpha / rank) * up @ down, in fp32."""

from __future__ import annotations

import torch
from torch import nn

from .lora_files import LoRAFile, LoRAFileError


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def resolve_names(lora: LoRAFile, linears: dict[str, nn.Linear]) -> dict[str, str]:
    """LoRA module name -> model module name; any name that matches no Linear layer is an error."""
    lookup = {name.replace(".", "_"): name for name in linears} if lora.underscored_names else {n: n for n in linears}
    unmatched = [name for name in lora.modules if name not in lookup]
    if unmatched:
        matched = len(lora.modules) - len(unmatched)
        raise LoRAFileError(
            f"LoRA {lora.path}: {len(unmatched)} of its {len(lora.modules)} modules match no layer of this model "
            f"(for example {unmatched[0]!r}); {matched} match. Is it a LoRA for another model?"
        )
    return {name: lookup[name] for name in lora.modules}


@torch.no_grad()
def merge_lora(model: nn.Module, lora: LoRAFile, multiplier: float = 1.0) -> int:
    """Add the LoRA to the model's weights; returns how many layers changed."""
    linears = linear_modules(model)
    for lora_name, module_name in resolve_names(lora, linears).items():
        weights, layer = lora.modules[lora_name], linears[module_name]
        expected = (layer.out_features, layer.in_features)
        if (weights.up.shape[0], weights.down.shape[1]) != expected:
            raise LoRAFileError(
                f"LoRA {lora.path}: {module_name} is {list(expected)} in the model but "
                f"{[weights.up.shape[0], weights.down.shape[1]]} in the LoRA"
            )
        device = layer.weight.device
        delta = weights.up.to(device, torch.float32) @ weights.down.to(device, torch.float32)
        merged = layer.weight.float() + (multiplier * weights.scale) * delta
        layer.weight.copy_(merged.to(layer.weight.dtype))
    return len(lora.modules)
