"""Merge LoRAs into a model's Linear weights, in fp32: W <- W + multiplier * delta, the delta of a LoRA being
(alpha / rank) * up @ down (LoHa's, LoKr's and DoRA's: networks/lora_files.py). Several files on one
layer are merged in their order, each on the weight the ones before it left (as ComfyUI does; only
DoRA, which rescales the whole weight, depends on the order)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .lora_files import LoRAFile, LoRAFileError, LoRAWeights, LycorisWeights, read_lora


def resolve_names(lora: LoRAFile, module_names: list[str]) -> dict[str, str]:
    """LoRA module name -> model module name; any name that matches no Linear layer is an error."""
    lookup = (
        {name.replace(".", "_"): name for name in module_names}
        if lora.underscored_names
        else {n: n for n in module_names}
    )
    unmatched = [name for name in lora.modules if name not in lookup]
    if unmatched:
        matched = len(lora.modules) - len(unmatched)
        raise LoRAFileError(
            f"LoRA {lora.path}: {len(unmatched)} of its {len(lora.modules)} modules match no layer of this model "
            f"(for example {unmatched[0]!r}); {matched} match. Is it a LoRA for another model?"
        )
    return {name: lookup[name] for name in lora.modules}


def merge_plan(
    loras: list[tuple[LoRAFile, float]], layer_shapes: Mapping[str, tuple[int, int]]
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Module name -> a function taking the layer's fp32 weight and giving it with all the LoRAs on it
    merged; every LoRA module must match a layer of ``layer_shapes`` ((out, in) per Linear) with the
    right shape."""
    parts: dict[str, list[tuple[LoRAWeights | LycorisWeights, float]]] = {}
    for lora, multiplier in loras:
        for lora_name, module_name in resolve_names(lora, list(layer_shapes)).items():
            weights = lora.modules[lora_name]
            if tuple(weights.shape) != tuple(layer_shapes[module_name]):
                raise LoRAFileError(
                    f"LoRA {lora.path}: {module_name} is {list(layer_shapes[module_name])} in the model but "
                    f"{list(weights.shape)} in the LoRA"
                )
            dora = weights.dora_scale
            if dora is not None and dora.shape[1] != layer_shapes[module_name][1]:
                raise LoRAFileError(
                    f"LoRA {lora.path}: {module_name} takes {layer_shapes[module_name][1]} inputs but its dora_scale "
                    f"is {list(dora.shape)}"
                )
            parts.setdefault(module_name, []).append((weights, multiplier))

    def merge(entries: list[tuple[LoRAWeights | LycorisWeights, float]]) -> Callable[[torch.Tensor], torch.Tensor]:
        def merged(weight: torch.Tensor) -> torch.Tensor:
            for w, m in entries:
                weight = w.merged(weight, m)
            return weight

        return merged

    return {name: merge(entries) for name, entries in parts.items()}


def weighted_loras(paths, multipliers) -> list[tuple[LoRAFile, float]]:
    """Each LoRA file read, with its multiplier (1 where fewer multipliers than files are given)."""
    return [(read_lora(p), multipliers[i] if i < len(multipliers) else 1.0) for i, p in enumerate(paths)]


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


@torch.no_grad()
def merge_lora(model: nn.Module, lora: LoRAFile, multiplier: float = 1.0) -> int:
    """Add the LoRA to the weights of a loaded model; returns how many layers changed."""
    linears = linear_modules(model)
    plan = merge_plan([(lora, multiplier)], {n: (m.out_features, m.in_features) for n, m in linears.items()})
    for name, merged in plan.items():
        layer = linears[name]
        layer.weight.copy_(merged(layer.weight.float()).to(layer.weight.dtype))
    return len(plan)
