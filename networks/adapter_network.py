"""The trainable network of adapters (LoRA, LoHa or LoKr modules) over the DiT's targeted Linear layers:
which layers, the ``--network_args`` options, optimizer groups, max-norm, saving and loading in kohya keys.

Targets (as the official and musubi-tuner LoRAs): in every text block ``self_attention.{to_query,
to_key, to_value, out_layer}`` and ``feed_forward.{in_layer, out_layer}``; in every visual block the
same plus ``cross_attention.*``. Modulations, embeddings and the output layer are never targeted.
``include_patterns=[...]`` and ``exclude_patterns=[...]`` (regular expressions matched against the
dotted module path) narrow or widen this.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from modules.atomic_save import save_safetensors_atomic
from modules.fp8 import FP8Linear
from modules.sharded_tensors import shaped_like, whole

from .adapter_module import AdapterModule
from .lora_files import LoRAFileError, read_lora
from .network_args import MODULE_OF_KIND, parse_network_args

PREFIX = "lora_unet_"
DEFAULT_INCLUDE = [
    r"(text|visual)_transformer_blocks\.\d+\.(self_attention|cross_attention)\.(to_query|to_key|to_value|out_layer)",
    r"(text|visual)_transformer_blocks\.\d+\.feed_forward\.(in_layer|out_layer)",
]


class AdapterNetwork(nn.Module):
    def __init__(self, modules: list[AdapterModule], loraplus_lr_ratio: float | None = None):
        super().__init__()
        self.loras = nn.ModuleDict({m.name: m for m in modules})
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.kind = modules[0].kind
        self.dora = modules[0].dora_scale is not None

    @property
    def network_module(self) -> str:
        return MODULE_OF_KIND[self.kind]

    def targets(self, model: nn.Module) -> list[tuple[AdapterModule, nn.Module]]:
        """Each adapter with the layer of ``model`` it adapts."""
        paths = {PREFIX + name.replace(".", "_"): name for name, _ in model.named_modules()}
        return [(lora, model.get_submodule(paths[lora.name])) for lora in self.loras.values()]

    def apply_to(self, model: nn.Module) -> None:
        """Route the targeted layers' forward through their adapter."""
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
        """Scale down each module whose weight change has a Frobenius norm above ``max_norm``, as kohya's
        max-norm regularization does; returns (modules scaled, mean norm, largest norm) before scaling."""
        norms, scaled = [], 0
        for lora in self.loras.values():
            norm = float(lora.delta_weight().norm())
            norms.append(norm)
            if norm > max_norm:
                lora.scale_update(max_norm / norm)
                scaled += 1
        return scaled, sum(norms) / len(norms), max(norms)

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The weights in kohya keys; a network sharded over processes (FSDP) is gathered, so every
        process must call this together."""
        return {
            f"{name}.{part}": whole(tensor).to("cpu", dtype, copy=True)  # a copy, not the live tensor
            for name, lora in self.loras.items()
            for part, tensor in lora.file_tensors().items()
        }

    def save(self, path: str | Path, metadata: dict[str, str], dtype: torch.dtype = torch.float32) -> None:
        save_safetensors_atomic(self.kohya_state_dict(dtype), path, metadata=metadata)

    @torch.no_grad()
    def load_weights(self, path: str | Path) -> None:
        """Continue from a saved file (any layout we read); its modules must be exactly this network's."""
        lora = read_lora(path)
        kinds = sorted({w.kind for w in lora.modules.values()})
        if kinds != [self.kind]:
            raise LoRAFileError(
                f"--network_weights {path} holds {' and '.join(kinds)} modules; this run trains {self.kind} "
                f"(--network_module {self.network_module}): give the --network_module the file was trained with"
            )
        names = {n if lora.underscored_names else PREFIX + n.replace(".", "_"): w for n, w in lora.modules.items()}
        names = {n if n.startswith(PREFIX) else PREFIX + n: w for n, w in names.items()}
        if set(names) != set(self.loras):
            missing, extra = sorted(set(self.loras) - set(names)), sorted(set(names) - set(self.loras))
            raise LoRAFileError(
                f"--network_weights {path} does not match this network: missing {missing[:2]}, "
                f"unexpected {extra[:2]} (check --network_args patterns)"
            )
        for name, weights in names.items():
            module, parts = self.loras[name], weights.parts()
            own = {part: t for part, t in module.file_tensors().items() if part != "alpha"}
            if set(parts) != set(own):
                dora = "with" if "dora_scale" in own else "without"
                raise LoRAFileError(
                    f"--network_weights {path}: {name} holds {sorted(parts)}, the network {sorted(own)} "
                    f"({self.kind} {dora} dora_wd, rank {module.rank}: check --network_dim and --network_args)"
                )
            for part, tensor in sorted(parts.items()):
                if tuple(tensor.shape) != tuple(own[part].shape):
                    raise LoRAFileError(
                        f"--network_weights {path}: {name}.{part} is {list(tensor.shape)}, the network's "
                        f"{list(own[part].shape)} (set --network_dim {weights.rank} or the same --network_args)"
                    )
            for part, tensor in parts.items():
                own[part].copy_(shaped_like(tensor, own[part]))
            if weights.alpha is not None:
                module.alpha.fill_(weights.alpha)


def _patterns(options: dict, key: str, default: list[str]) -> list[re.Pattern]:
    patterns = []
    for text in options.get(key, default):
        try:
            patterns.append(re.compile(text))
        except (re.error, TypeError) as error:
            raise ValueError(f"--network_args {key}: {text!r} is not a regular expression ({error})") from None
    return patterns


def network_factory(module_class: type[AdapterModule]):
    """The ``create_network`` of a network module (the function musubi-tuner-style trainers call)."""

    def create_network(
        model: nn.Module,
        network_dim: int,
        network_alpha: float | None,
        network_dropout: float = 0.0,
        network_args: list[str] | None = None,
    ) -> AdapterNetwork:
        return build_network(module_class, model, network_dim, network_alpha, network_dropout, network_args)

    create_network.__doc__ = f"The {module_class.kind} network of ``model``'s targeted Linear layers."
    return create_network


def build_network(
    module_class: type[AdapterModule],
    model: nn.Module,
    network_dim: int,
    network_alpha: float | None,
    network_dropout: float = 0.0,
    network_args: list[str] | None = None,
) -> AdapterNetwork:
    """A network of ``module_class`` adapters on ``model``'s targeted Linear layers; the class's
    ``extra_args`` (name -> type) are the ``--network_args`` it takes beyond the common ones."""
    extra = getattr(module_class, "extra_args", {})
    options = parse_network_args(network_args, extra, module_class.kind)
    include = _patterns(options, "include_patterns", DEFAULT_INCLUDE)
    exclude = _patterns(options, "exclude_patterns", [])
    own = {key: options[key] for key in extra if key in options and key != "loraplus_lr_ratio"}
    modules = []
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.Linear | FP8Linear) or "modulation" in name:
            continue
        if any(p.fullmatch(name) for p in include) and not any(p.fullmatch(name) for p in exclude):
            module = module_class(
                PREFIX + name.replace(".", "_"),
                layer,
                network_dim,
                network_alpha,
                dropout=network_dropout or 0.0,
                rank_dropout=options.get("rank_dropout", 0.0),
                module_dropout=options.get("module_dropout", 0.0),
                dora=options.get("dora_wd", False),
                **own,
            )
            modules.append(module)
            if options.get("verbose"):
                print(f"{module.kind} on {name}: rank {network_dim}, alpha {network_alpha or network_dim}")
    if not modules:
        raise ValueError(
            f"the {module_class.kind} targets no layer of this model (check include_patterns / exclude_patterns)"
        )
    return AdapterNetwork(modules, options.get("loraplus_lr_ratio"))
