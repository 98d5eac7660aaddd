"""LoRA for the Kandinsky 5 DiT: the trainable network, saved in kohya format.

Targets (as the official and musubi-tuner LoRAs): in every text block ``self_attention.{to_query,
to_key, to_value, out_layer}`` and ``feed_forward.{in_layer, out_layer}``; in every visual block the
same plus ``cross_attention.*``: 6 and 10 Linear layers. Modulations, embeddings and the output
layer are never targeted. ``network_args`` can narrow or widen this with regular expressions
(``include_patterns=[...]``, ``exclude_patterns=[...]``, matched against the dotted module path).

Each targeted Linear keeps its own weights; its forward becomes
``y = W x + b + (alpha / rank) * up(dropout(down(x)))``, with ``up`` zero at the start.
Files hold ``lora_unet_<path with _>.lora_down.weight`` (rank, in), ``.lora_up.weight`` (out, rank)
and ``.alpha``, which ComfyUI and musubi-tuner load unchanged.
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modules.atomic_save import save_safetensors_atomic
from modules.fp8 import FP8Linear
from modules.sharded_tensors import shaped_like, whole

from .lora_files import LoRAFileError, read_lora

PREFIX = "lora_unet_"
DEFAULT_INCLUDE = [
    r"(text|visual)_transformer_blocks\.\d+\.(self_attention|cross_attention)\.(to_query|to_key|to_value|out_layer)",
    r"(text|visual)_transformer_blocks\.\d+\.feed_forward\.(in_layer|out_layer)",
]
NETWORK_ARGS = {
    "include_patterns": list,
    "exclude_patterns": list,
    "rank_dropout": float,
    "module_dropout": float,
    "loraplus_lr_ratio": float,
    "verbose": bool,
}


class _DownProjection(torch.autograd.Function):
    """F.linear(x.to(weight.dtype), weight) that keeps ``x`` in its own dtype for the backward and
    widens it again there. The fp32 copy autograd would keep is twice the size of a bf16 input, and
    one is kept per layer, where the q, k and v LoRAs of an attention share one input."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
        return grad_x, grad_weight


def down_projection(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A LoRA's down projection of ``x`` in the dtype of its ``weight`` (normally fp32 over a bf16
    input). It runs inside the DiT, where autocast is off."""
    if x.dtype == weight.dtype:
        return F.linear(x.to(weight.dtype), weight)
    return _DownProjection.apply(x, weight)


class LoRAModule(nn.Module):
    """The low-rank update of one Linear layer."""

    def __init__(
        self,
        name: str,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
    ):
        super().__init__()
        self.name, self.rank = name, rank
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha or rank)))
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.base_forward = base.forward  # the layer's own forward, kept before the LoRA replaces it

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return out
        hidden = down_projection(x, self.lora_down.weight)
        scale = self.scale
        if self.training and self.dropout:
            hidden = F.dropout(hidden, p=self.dropout)
        if self.training and self.rank_dropout:
            keep = torch.rand(hidden.shape[:-1] + (self.rank,), device=hidden.device) > self.rank_dropout
            hidden, scale = hidden * keep.to(hidden.dtype), scale / (1.0 - self.rank_dropout)
        # in place (neither product keeps its output for the backward): the layer's result is the
        # base output allocated first, and the fp32 update, freed right away, leaves no hole below it
        return out.add_(self.lora_up(hidden).mul_(scale).to(out.dtype))


def parse_network_args(values: list[str] | None) -> dict:
    """``key=value`` strings (values are Python literals) into typed options; unknown keys are errors."""
    parsed = {}
    for text in values or []:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or key not in NETWORK_ARGS:
            raise ValueError(f"--network_args {text!r}: expected key=value with key one of {', '.join(NETWORK_ARGS)}")
        try:
            parsed[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed[key] = value.strip()
        kind = NETWORK_ARGS[key]
        if kind is float and isinstance(parsed[key], int | float) and not isinstance(parsed[key], bool):
            parsed[key] = float(parsed[key])
        if not isinstance(parsed[key], kind):
            raise ValueError(f"--network_args {key}: expected a {kind.__name__}, got {value!r}")
    return parsed


class LoRANetwork(nn.Module):
    def __init__(self, modules: list[LoRAModule], loraplus_lr_ratio: float | None = None):
        super().__init__()
        self.loras = nn.ModuleDict({m.name: m for m in modules})
        self.loraplus_lr_ratio = loraplus_lr_ratio

    def targets(self, model: nn.Module) -> list[tuple[LoRAModule, nn.Module]]:
        """Each LoRA module with the layer of ``model`` it adapts."""
        paths = {PREFIX + name.replace(".", "_"): name for name, _ in model.named_modules()}
        return [(lora, model.get_submodule(paths[lora.name])) for lora in self.loras.values()]

    def apply_to(self, model: nn.Module) -> None:
        """Route the targeted layers' forward through their LoRA."""
        for lora, layer in self.targets(model):
            layer.forward = lora.forward

    def parameter_groups(self, learning_rate: float) -> list[dict]:
        """One group, or with LoRA+ the up matrices in a second group at ``learning_rate * ratio``."""
        if not self.loraplus_lr_ratio:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": learning_rate}]
        up = [p for n, p in self.named_parameters() if "lora_up" in n]
        down = [p for n, p in self.named_parameters() if "lora_up" not in n]
        return [{"params": down, "lr": learning_rate}, {"params": up, "lr": learning_rate * self.loraplus_lr_ratio}]

    @torch.no_grad()
    def scale_weight_norms(self, max_norm: float) -> tuple[int, float, float]:
        """Scale down each module whose update up @ down * alpha/rank has a Frobenius norm above
        ``max_norm`` (both matrices by the square root of the ratio), as kohya's max-norm
        regularization does; returns (modules scaled, mean norm, largest norm) before scaling."""
        norms, scaled = [], 0
        for lora in self.loras.values():
            up, down = lora.lora_up.weight, lora.lora_down.weight
            norm = float((up.float() @ down.float()).norm() * lora.scale)
            norms.append(norm)
            if norm > max_norm:
                ratio = (max_norm / norm) ** 0.5
                up.mul_(ratio)
                down.mul_(ratio)
                scaled += 1
        return scaled, sum(norms) / len(norms), max(norms)

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The weights in kohya keys; a LoRA sharded over processes (FSDP) is gathered, so every
        process must call this together."""
        state = {}
        for name, lora in self.loras.items():
            state[f"{name}.lora_down.weight"] = whole(lora.lora_down.weight.detach()).to("cpu", dtype)
            state[f"{name}.lora_up.weight"] = whole(lora.lora_up.weight.detach()).to("cpu", dtype)
            state[f"{name}.alpha"] = lora.alpha.detach().to("cpu", dtype)
        return state

    def save(self, path: str | Path, metadata: dict[str, str], dtype: torch.dtype = torch.float32) -> None:
        save_safetensors_atomic(self.kohya_state_dict(dtype), path, metadata=metadata)

    @torch.no_grad()
    def load_weights(self, path: str | Path) -> None:
        """Continue from a saved LoRA (any layout we read); its modules must be exactly this network's."""
        lora = read_lora(path)
        other = sorted({w.kind for w in lora.modules.values() if w.kind != "LoRA"})
        if other:
            kinds = " and ".join(other)
            raise LoRAFileError(f"--network_weights {path} holds {kinds} modules; training continues LoRA files only")
        names = {n if lora.underscored_names else PREFIX + n.replace(".", "_"): w for n, w in lora.modules.items()}
        names = {n if n.startswith(PREFIX) else PREFIX + n: w for n, w in names.items()}
        if set(names) != set(self.loras):
            missing, extra = sorted(set(self.loras) - set(names)), sorted(set(names) - set(self.loras))
            raise LoRAFileError(
                f"--network_weights {path} does not match this network: missing {missing[:2]}, "
                f"unexpected {extra[:2]} (check --network_args patterns)"
            )
        for name, weights in names.items():
            module = self.loras[name]
            if weights.rank != module.rank:
                raise LoRAFileError(
                    f"--network_weights {path}: {name} has rank {weights.rank}, the network "
                    f"{module.rank} (set --network_dim {weights.rank})"
                )
            module.lora_down.weight.copy_(shaped_like(weights.down, module.lora_down.weight))
            module.lora_up.weight.copy_(shaped_like(weights.up, module.lora_up.weight))
            module.alpha.fill_(weights.alpha)


def _patterns(options: dict, key: str, default: list[str]) -> list[re.Pattern]:
    patterns = []
    for text in options.get(key, default):
        try:
            patterns.append(re.compile(text))
        except (re.error, TypeError) as error:
            raise ValueError(f"--network_args {key}: {text!r} is not a regular expression ({error})") from None
    return patterns


def create_network(
    model: nn.Module,
    network_dim: int,
    network_alpha: float | None,
    network_dropout: float = 0.0,
    network_args: list[str] | None = None,
) -> LoRANetwork:
    """The LoRA network for ``model``'s targeted Linear layers (see the module docstring)."""
    options = parse_network_args(network_args)
    include = _patterns(options, "include_patterns", DEFAULT_INCLUDE)
    exclude = _patterns(options, "exclude_patterns", [])
    modules = []
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.Linear | FP8Linear) or "modulation" in name:
            continue
        if any(p.fullmatch(name) for p in include) and not any(p.fullmatch(name) for p in exclude):
            modules.append(
                LoRAModule(
                    PREFIX + name.replace(".", "_"),
                    layer,
                    network_dim,
                    network_alpha,
                    network_dropout or 0.0,
                    options.get("rank_dropout", 0.0),
                    options.get("module_dropout", 0.0),
                )
            )
            if options.get("verbose"):
                print(f"LoRA on {name}: rank {network_dim}, alpha {network_alpha or network_dim}")
    if not modules:
        raise ValueError("the LoRA targets no layer of this model (check include_patterns / exclude_patterns)")
    return LoRANetwork(modules, options.get("loraplus_lr_ratio"))
