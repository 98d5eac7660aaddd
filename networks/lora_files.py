"""Read LoRA files of every layout Kandinsky 5 LoRAs come in, into one form.

- kohya / musubi-tuner / ComfyUI: ``lora_unet_<path with _>.lora_down.weight``, ``.lora_up.weight``
  and ``.alpha`` (scale = alpha / rank).
- PEFT / diffusers: ``[transformer.|base_model.model.|diffusion_model.]<path>.lora_A[.default].weight``
  and ``lora_B``; alpha from ``config_lora.json`` beside the file, from diffusers'
  ``lora_adapter_metadata``, from per-module ``.alpha`` keys, or else equal to the rank.
- The official layout: a folder with ``lora.safetensors`` and ``config_lora.json``.
- LyCORIS LoHa and LoKr modules under kohya names (``lora_unet_`` or ``lycoris_`` prefixes), as ComfyUI
  reads them: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (delta = (w1_a w1_b) * (w2_a w2_b),
  times alpha / rank), and ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b`` with ``lokr_w2`` or
  ``lokr_w2_a``/``lokr_w2_b`` (delta = kron(w1, w2), times alpha / rank when a factor is low-rank).
  They merge like LoRAs; the PEFT layouts cannot hold them.
- DoRA: any of these kohya modules with ``dora_scale`` (1, in) as LyCORIS writes it, merged as ComfyUI does:
  W' = W + multiplier * ((W + delta) * dora_scale / ||W + delta|| - W), the norm per input column.

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

KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
PEFT_PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.")
LYCORIS_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
                 "lokr_w2_a", "lokr_w2_b")  # fmt: skip
_KOHYA = re.compile(
    rf"^(?P<name>[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha|{'|'.join(LYCORIS_PARTS)}|dora_scale|\w+)$"
)
_PEFT = re.compile(r"^(?P<name>.+)\.(?P<part>lora_A|lora_B)(?:\.default)?\.weight$|^(?P<alpha_name>.+)\.alpha$")


class LoRAFileError(ValueError):
    pass


def merged(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor | None, multiplier: float):
    """The fp32 ``weight`` with a module's ``delta`` merged at ``multiplier``; DoRA's column rescaling
    when ``dora_scale`` is given (ComfyUI's weight_decompose)."""
    delta = delta.to(weight.device)
    if dora_scale is None:
        return weight + multiplier * delta
    adapted = weight + delta
    adapted = adapted * (dora_scale.to(weight.device, torch.float32) / adapted.norm(dim=0, keepdim=True))
    return weight + multiplier * (adapted - weight)


@dataclass
class LoRAWeights:
    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    alpha: float
    dora_scale: torch.Tensor | None = None  # (1, in_features) for DoRA

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    kind = "LoRA"

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    def delta(self) -> torch.Tensor:
        """The fp32 change of the layer's weight (multiplier 1), before any DoRA rescaling."""
        return self.scale * (self.up.float() @ self.down.float())

    def merged(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        return merged(weight, self.delta(), self.dora_scale, multiplier)

    def parts(self) -> dict[str, torch.Tensor]:
        """The tensors by the names training's modules give them."""
        parts = {"lora_down.weight": self.down, "lora_up.weight": self.up}
        return parts | ({"dora_scale": self.dora_scale} if self.dora_scale is not None else {})


@dataclass
class LycorisWeights:
    """A LoHa or LoKr module (``kind``), with its tensors by their LyCORIS names and its alpha (None: none stored)."""

    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        t = self.tensors
        low = t.get("hada_w1_b", t.get("lokr_w2_b", t.get("lokr_w1_b")))
        return low.shape[0] if low is not None else max(t["lokr_w2"].shape)

    def merged(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        return merged(weight, self.delta(), self.dora_scale, multiplier)

    def parts(self) -> dict[str, torch.Tensor]:
        return self.tensors | ({"dora_scale": self.dora_scale} if self.dora_scale is not None else {})

    def _pair(self, name: str) -> tuple[torch.Tensor, int | None]:
        """LoKr's factor ``name`` (w1 or w2): stored whole, or as a low-rank product (its rank returned)."""
        whole = self.tensors.get(f"lokr_{name}")
        if whole is not None:
            return whole.float(), None
        a, b = self.tensors[f"lokr_{name}_a"].float(), self.tensors[f"lokr_{name}_b"].float()
        return a @ b, b.shape[0]

    def delta(self) -> torch.Tensor:
        t = self.tensors
        if self.kind == "LoHa":
            rank = t["hada_w1_b"].shape[0]
            first = t["hada_w1_a"].float() @ t["hada_w1_b"].float()
            product = first * (t["hada_w2_a"].float() @ t["hada_w2_b"].float())
            return product * (self.alpha / rank if self.alpha is not None else 1.0)
        (w1, rank1), (w2, rank2) = self._pair("w1"), self._pair("w2")
        rank = rank2 if rank2 is not None else rank1  # as ComfyUI: the rank of the low-rank factor, w2's first
        return torch.kron(w1, w2) * (self.alpha / rank if self.alpha is not None and rank is not None else 1.0)

    @property
    def shape(self) -> tuple[int, int]:
        t = self.tensors
        if self.kind == "LoHa":
            return t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]
        sizes = []
        for name in ("w1", "w2"):
            whole = t.get(f"lokr_{name}")
            sizes.append(tuple(whole.shape) if whole is not None else
                         (t[f"lokr_{name}_a"].shape[0], t[f"lokr_{name}_b"].shape[1]))  # fmt: skip
        return sizes[0][0] * sizes[1][0], sizes[0][1] * sizes[1][1]


@dataclass
class LoRAFile:
    path: Path
    modules: dict[str, LoRAWeights | LycorisWeights]  # module name -> weights; underscored when ``underscored_names``
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
        short = name.removeprefix(KOHYA_PREFIXES[0]).removeprefix(KOHYA_PREFIXES[1]).removeprefix(KOHYA_PREFIXES[2])
        if kohya and (lycoris := _lycoris(file, name, p)) is not None:
            modules[short] = lycoris
            continue
        if "down" not in p or "up" not in p:
            raise LoRAFileError(f"LoRA {file}: module {name!r} lacks its {'up' if 'down' in p else 'down'} matrix")
        if p["down"].shape[0] != p["up"].shape[1]:
            raise LoRAFileError(
                f"LoRA {file}: module {name!r} has down {list(p['down'].shape)} and up "
                f"{list(p['up'].shape)}, whose ranks differ"
            )
        rank = p["down"].shape[0]
        alpha = float(p["alpha"]) if "alpha" in p else (file_alpha if file_alpha is not None else float(rank))
        modules[short if kohya else name] = LoRAWeights(p["down"], p["up"], alpha, p.get("dora_scale"))
    return LoRAFile(file, modules, kohya, metadata)


def _lycoris(file: Path, name: str, parts: dict[str, torch.Tensor]) -> LycorisWeights | None:
    """The module as LoHa or LoKr when its parts are LyCORIS's; None for a LoRA module; others are an error."""
    names = set(parts) - {"alpha", "dora_scale"}
    alpha = float(parts["alpha"]) if "alpha" in parts else None
    dora_scale = parts.get("dora_scale")
    if dora_scale is not None and (dora_scale.ndim != 2 or dora_scale.shape[0] != 1):
        raise LoRAFileError(
            f"LoRA {file}: module {name!r} has dora_scale {list(dora_scale.shape)}; expected (1, in_features), "
            "the per-input-column magnitude LyCORIS writes"
        )
    if names <= {"down", "up"}:
        return None
    if names == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}:
        return LycorisWeights("LoHa", {k: parts[k] for k in names}, alpha, dora_scale)
    w1_ok = names & {"lokr_w1"} or {"lokr_w1_a", "lokr_w1_b"} <= names
    w2_ok = names & {"lokr_w2"} or {"lokr_w2_a", "lokr_w2_b"} <= names
    if w1_ok and w2_ok and names <= set(LYCORIS_PARTS):
        return LycorisWeights("LoKr", {k: parts[k] for k in names}, alpha, dora_scale)
    raise LoRAFileError(
        f"LoRA {file}: module {name!r} holds {sorted(names)}: not a LoRA (lora_down/lora_up), LoHa (hada_w1_a...) "
        "or LoKr (lokr_w1/lokr_w2 or their _a/_b factors) module of a known layout (Tucker and conv parts are not read)"
    )
