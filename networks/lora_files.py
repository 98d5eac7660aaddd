"""Read LoRA files of every layout Kandinsky 5 LoRAs come in, into one form.

- kohya / musubi-tuner / ComfyUI: ``lora_unet_<path with _>.lora_down.weight``, ``.lora_up.weight``
  and ``.alpha`` (scale = alpha / rank).
- PEFT / diffusers: ``[transformer.|base_model.model.|diffusion_model.]<path>.lora_A[.default].weight``
  and ``lora_B``; alpha from ``config_lora.json`` beside the file, from diffusers'
  ``lora_adapter_metadata``, from per-module ``.alpha`` keys, or else equal to the rank.
- The official layout: a folder with ``lora.safetensors`` and ``config_lora.json``.

Kohya names have dots replaced by underscores; they are resolved against the model's real module
names later, since names like ``to_query`` contain underscores themselves.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
PEFT_PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.")
_KOHYA = re.compile(r"^(?P<name>[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^(?P<name>.+)\.(?P<part>lora_A|lora_B)(?:\.default)?\.weight$|^(?P<alpha_name>.+)\.alpha$")


class LoRAFileError(ValueError):
    pass


@dataclass
class LoRAWeights:
    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class LoRAFile:
    path: Path
    modules: dict[str, LoRAWeights]  # module name -> weights; underscored when ``underscored_names``
    underscored_names: bool
    metadata: dict[str, str]


def _file_and_config(path: Path) -> tuple[Path, Path | None]:
    if not path.exists():
        raise LoRAFileError(f"LoRA {path} does not exist")
    if path.is_dir():
        files = (
            [path / "lora.safetensors"] if (path / "lora.safetensors").exists() else sorted(path.glob("*.safetensors"))
        )
        if len(files) != 1:
            raise LoRAFileError(f"LoRA folder {path} should hold lora.safetensors (and config_lora.json)")
        path = files[0]
    config = path.parent / "config_lora.json"
    return path, config if config.exists() else None


def _peft_alpha(config: Path | None, metadata: dict[str, str]) -> float | None:
    if config is not None:
        values = json.loads(config.read_text())
        if "lora_alpha" in values:
            return float(values["lora_alpha"])
    if "lora_adapter_metadata" in metadata:
        values = json.loads(metadata["lora_adapter_metadata"])
        for key in ("transformer.lora_alpha", "lora_alpha"):
            if key in values:
                return float(values[key])
    return None


def read_lora(path: str | Path) -> LoRAFile:
    file, config = _file_and_config(Path(path))
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:
        raise LoRAFileError(f"cannot read LoRA {file}: {error}") from None
    if not tensors:
        raise LoRAFileError(f"LoRA {file} holds no tensors")
    broken = next((key for key, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if broken is not None:
        raise LoRAFileError(f"LoRA {file}: tensor {broken!r} holds NaN or infinite values (a diverged or damaged file)")
    kohya = all(k.startswith(KOHYA_PREFIXES) for k in tensors)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if kohya:
            match = _KOHYA.match(key)
            name, part = (match["name"], match["part"]) if match else (None, None)
            part = {"lora_down.weight": "down", "lora_up.weight": "up"}.get(part, part)
        else:
            stripped = next((key[len(p) :] for p in PEFT_PREFIXES if key.startswith(p)), key)
            match = _PEFT.match(stripped)
            if match and match["alpha_name"]:
                name, part = match["alpha_name"], "alpha"
            elif match:
                name, part = match["name"], {"lora_A": "down", "lora_B": "up"}[match["part"]]
            else:
                name, part = None, None
        if name is None:
            raise LoRAFileError(f"LoRA {file}: key {key!r} is not a LoRA key of a known layout (kohya or PEFT)")
        parts.setdefault(name, {})[part] = tensor
    file_alpha = None if kohya else _peft_alpha(config, metadata)
    modules = {}
    for name, p in parts.items():
        if "down" not in p or "up" not in p:
            raise LoRAFileError(f"LoRA {file}: module {name!r} lacks its {'up' if 'down' in p else 'down'} matrix")
        if p["down"].shape[0] != p["up"].shape[1]:
            raise LoRAFileError(
                f"LoRA {file}: module {name!r} has down {list(p['down'].shape)} and up "
                f"{list(p['up'].shape)}, whose ranks differ"
            )
        rank = p["down"].shape[0]
        alpha = float(p["alpha"]) if "alpha" in p else (file_alpha if file_alpha is not None else float(rank))
        modules[name.removeprefix(KOHYA_PREFIXES[0]).removeprefix(KOHYA_PREFIXES[1]) if kohya else name] = LoRAWeights(
            p["down"], p["up"], alpha
        )
    return LoRAFile(file, modules, kohya, metadata)
