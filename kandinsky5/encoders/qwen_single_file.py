"""Qwen2.5-VL-7B-Instruct from one safetensors file, as ComfyUI keeps it in ``models/text_encoders/``:
``qwen_2.5_vl_7b.safetensors`` (bf16) or ``qwen_2.5_vl_7b_fp8_scaled.safetensors``.

Such a file holds the weights under the published checkpoint's key names (``model.layers.*``,
``model.embed_tokens.*``, ``visual.*``, maybe ``lm_head.*``), possibly behind a prefix ComfyUI adds
when it saves a text encoder. In the fp8 variant the Linear weights are float8_e4m3fn with one
fp32 scale each (``<layer>.scale_weight``, or ``<layer>.weight_scale`` in ComfyUI's newer format);
they are dequantized as they are read. The configuration is Qwen2.5-VL-7B-Instruct's own (shipped
in ``data/qwen2_5_vl_7b_config.json``), or one a file carries in its metadata under ``config``
(the tiny test files do); the tokenizer and image processor are shipped with the package.
Tensors are read one at a time, never by mapping the 16 GB file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modules.fp8 import check_scale
from modules.safetensors_read import SafetensorsFile, SafetensorsFormatError

CONFIG_FILE = Path(__file__).parent / "data" / "qwen2_5_vl_7b_config.json"
KEY_PREFIXES = ("text_encoders.qwen25_7b.transformer.", "qwen25_7b.transformer.", "transformer.")
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
IGNORED_KEYS = ("scaled_fp8",)
EMBEDDINGS = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight")
# Qwen2.5-VL's image preprocessing (its preprocessor_config.json)
IMAGE_PROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


class QwenFileError(ValueError):
    pass


def _prefix(keys: list[str]) -> str:
    for prefix in KEY_PREFIXES:
        if any(key.startswith(prefix + "model.") for key in keys):
            return prefix
    return ""


def is_qwen_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors"


def read_qwen_file(path: Path, dtype: torch.dtype) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict in ``dtype`` under the published key names) of a single-file Qwen."""
    try:
        with SafetensorsFile(path) as f:
            keys, metadata = f.keys(), f.metadata()
            prefix = _prefix(keys)
            names = {key[len(prefix) :]: key for key in keys if key.startswith(prefix)}
            embedding = next((names[name] for name in EMBEDDINGS if name in names), None)
            if embedding is None:
                found = ", ".join(sorted(keys)[:3])
                raise QwenFileError(
                    f"{path} is not a Qwen2.5-VL weights file: expected keys such as model.embed_tokens.weight and "
                    f"model.layers.0.self_attn.q_proj.weight (the published checkpoint's names), found {found} ..."
                )
            config = json.loads(metadata["config"]) if "config" in metadata else json.loads(CONFIG_FILE.read_text())
            _check_sizes(path, config, f.shape(embedding))
            scales = {
                name[: -len(suffix)]: names[name]
                for name in names
                for suffix in SCALE_SUFFIXES
                if name.endswith(suffix)
            }
            state = {}
            for name, key in names.items():
                if name in IGNORED_KEYS or name.endswith(SCALE_SUFFIXES + IGNORED_SUFFIXES):
                    continue
                tensor = f.get_tensor(key)
                layer = name.removesuffix(".weight")
                if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    if layer not in scales:
                        raise QwenFileError(f"{path}: {key} is float8 but has no scale ({layer}.scale_weight)")
                    scale = check_scale(f.get_tensor(scales[layer]).float(), scales[layer], str(path))
                    if scale.ndim == 1 and scale.numel() == tensor.shape[0]:
                        scale = scale[:, None]
                    tensor = tensor.float() * scale
                state[name] = tensor.to(dtype)
    except (OSError, SafetensorsFormatError) as error:
        raise QwenFileError(f"cannot read {path} as safetensors: {error}") from None
    return config, state


def _check_sizes(path: Path, config: dict, embedding_shape: tuple[int, ...]) -> None:
    text = config.get("text_config") or config
    expected = (text["vocab_size"], text["hidden_size"])
    if tuple(embedding_shape) != expected:
        raise QwenFileError(
            f"{path}: its token embedding is {list(embedding_shape)}, Qwen2.5-VL-7B-Instruct's is {list(expected)} "
            "(vocabulary x hidden size). Kandinsky 5 uses the 7B model; a 3B file (hidden size 2048) does not work."
        )


def hidden_size(config: dict) -> int:
    return int((config.get("text_config") or config)["hidden_size"])
