"""The two VAEs of Kandinsky 5, over diffusers' models.

- ``hunyuan``: HunyuanVideo's causal 3-D VAE (video tasks). 4x in time (the first frame alone),
  8x in space, 16 channels; latents are scaled by 0.476986.
- ``flux``: FLUX.1's image VAE (image tasks). 8x in space, 16 channels; latents are scaled by
  0.3611 and, as in the official code and diffusers' Kandinsky pipelines, not shifted.

Pixels are (B, 3, F, H, W) in [-1, 1]; latents are (B, T, H/8, W/8, 16), the DiT's layout.
Weights load from a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``),
a single ``.safetensors`` file, or the original HunyuanVideo ``pytorch_model.pt`` (unwrapped from
``state_dict``, ``vae.`` prefix removed). HunyuanVideo's key names are the same in all of them
(ComfyUI's ``hunyuan_video_vae_bf16.safetensors`` included); a HunyuanVideo VAE in ComfyUI's own
layout (as ComfyUI saves one) is renamed (vae_layouts.py); FLUX's ``ae.safetensors`` as Black
Forest Labs and ComfyUI ship it (``encoder.down.0.block.0...``) is converted to diffusers' names
with diffusers' own converter. A single file without a config beside it uses the official
configuration, or the one in its metadata under ``config`` (the tiny test files carry theirs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, AutoencoderKLHunyuanVideo
from safetensors.torch import load_file

from kandinsky5.encoders.vae_layouts import comfy_to_diffusers, is_comfy_layout
from modules.safetensors_read import SafetensorsFile

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "pytorch_model.pt", "pytorch_model.bin")
# Config fields that the original (Tencent) HunyuanVideo config.json shares with diffusers' class.
SHARED_CONFIG_FIELDS = (
    "in_channels",
    "out_channels",
    "latent_channels",
    "block_out_channels",
    "layers_per_block",
    "norm_num_groups",
    "act_fn",
    "mid_block_add_attention",
)


DEFAULT_TILE_FRAMES = 16  # pixel frames per temporal tile of the HunyuanVideo VAE (4 latent frames + 1)


def tile_stride(length: int) -> int:
    """The step between tiles of ``length`` (pixels or frames): they overlap by a quarter, blended."""
    return length * 3 // 4


class VAEError(ValueError):
    pass


@dataclass(frozen=True)
class VAEKind:
    name: str
    model_class: type
    scale: float
    default_config: dict[str, Any]
    description: str


HUNYUAN = VAEKind("hunyuan", AutoencoderKLHunyuanVideo, 0.476986, {}, "the HunyuanVideo 3-D VAE (video tasks)")
FLUX = VAEKind(
    "flux",
    AutoencoderKL,
    0.3611,
    dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    "the FLUX.1 image VAE (image tasks)",
)
VAE_KINDS = {kind.name: kind for kind in (HUNYUAN, FLUX)}


def _find_weights(path: Path) -> Path:
    if path.is_file():
        return path
    for folder in (path, path / "vae"):
        for name in WEIGHT_FILES:
            if (folder / name).exists():
                return folder / name
    raise VAEError(f"no VAE weights in {path} (looked for {', '.join(WEIGHT_FILES)}, also in a vae/ subfolder)")


def read_vae_weights(file: Path) -> dict[str, torch.Tensor]:
    """A VAE state dict from safetensors or a torch pickle, unwrapped and without a ``vae.`` prefix."""
    try:
        if file.suffix == ".safetensors":
            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise VAEError(f"cannot read VAE weights {file}: {error}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if any(k.startswith("vae.") for k in state):
        state = {k[4:]: v for k, v in state.items() if k.startswith("vae.")}
    return state


def detect_kind(state: dict[str, torch.Tensor]) -> str:
    """``hunyuan`` (3-D convolutions) or ``flux`` (2-D), from the first convolution's weight."""
    for key in ("encoder.conv_in.conv.weight", "decoder.conv_in.conv.weight"):
        if key in state and state[key].ndim == 5:
            return "hunyuan"
    for key in ("encoder.conv_in.weight", "decoder.conv_in.weight"):
        if key in state and state[key].ndim == 4:
            return "flux"
    raise VAEError("the weights are neither a HunyuanVideo VAE nor a FLUX VAE (no encoder/decoder conv_in)")


BFL_FLUX_KEY = "encoder.down.0.block.0.conv1.weight"  # Black Forest Labs' (and ComfyUI's) ae.safetensors


def _metadata_config(weights: Path) -> dict[str, Any] | None:
    if weights.suffix != ".safetensors":
        return None
    with SafetensorsFile(weights) as f:
        text = f.metadata().get("config")
    return json.loads(text) if text else None


def _config(kind: VAEKind, weights: Path) -> dict[str, Any]:
    config_file = weights.parent / "config.json"
    if not config_file.exists():
        return _metadata_config(weights) or dict(kind.default_config)
    config = json.loads(config_file.read_text())
    if config.get("_class_name") == kind.model_class.__name__:
        return {k: v for k, v in config.items() if not k.startswith("_")}
    return {k: config[k] for k in SHARED_CONFIG_FIELDS if k in config}  # the original HunyuanVideo config


class VAE:
    """Encode pixels to DiT latents and back."""

    def __init__(self, model: torch.nn.Module, kind: VAEKind):
        self.model, self.kind = model, kind

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def enable_tiling(self, tile_size: int | None = None, tile_frames: int | None = None) -> None:
        """Encode/decode in spatial tiles of ``tile_size`` pixels (and, for video, ``tile_frames`` frames),
        overlapping by a quarter and blended; None keeps the VAE's own size (``default_tile_size``)."""
        if self.kind is HUNYUAN:
            stride = None if tile_size is None else tile_stride(tile_size)
            frame_stride = None if tile_frames is None else tile_stride(tile_frames)
            self.model.use_framewise_encoding = self.model.use_framewise_decoding = True
            self.model.enable_tiling(
                tile_sample_min_height=tile_size,
                tile_sample_min_width=tile_size,
                tile_sample_min_num_frames=tile_frames,
                tile_sample_stride_height=stride,
                tile_sample_stride_width=stride,
                tile_sample_stride_num_frames=frame_stride,
            )
        else:
            self.model.enable_tiling()
            if tile_size:
                self.model.tile_sample_min_size = tile_size
                self.model.tile_latent_min_size = tile_size // 8

    def disable_tiling(self) -> None:
        """Encode/decode in one piece: no spatial tiles and, for video, no chunks of frames."""
        self.model.use_tiling = False
        if self.kind is HUNYUAN:
            self.model.use_framewise_encoding = self.model.use_framewise_decoding = False

    def default_tile_size(self) -> int:
        """Tile side in pixels when none is given: 256 for HunyuanVideo (as diffusers and musubi-tuner),
        the config's sample_size for FLUX (1024 for the real VAE: a 1024x1024 image is one tile)."""
        return 256 if self.kind is HUNYUAN else int(self.model.config.sample_size)

    def set_decode_tiling(self, tiled: bool, tile_size: int | None = None, tile_frames: int | None = None) -> str:
        """Tiled (the default of generation) or one-piece decoding; returns what was chosen, in words."""
        if not tiled:
            self.disable_tiling()
            return "VAE decode: in one piece (--no_vae_tiling)"
        size = tile_size or self.default_tile_size()
        frames = tile_frames or DEFAULT_TILE_FRAMES
        self.enable_tiling(size, frames if self.kind is HUNYUAN else None)
        chunks = (
            f", {frames}-frame chunks overlapping by {frames - tile_stride(frames)}" if self.kind is HUNYUAN else ""
        )
        overlap = size - tile_stride(size)
        return f"VAE decode: tiles of {size} px overlapping by {overlap} px{chunks} (--no_vae_tiling: one piece)"

    def check_frames(self, frames: int) -> None:
        if self.kind is FLUX and frames != 1:
            raise VAEError(f"the FLUX image VAE encodes single images, got {frames} frames")
        if self.kind is HUNYUAN and (frames - 1) % 4:
            low = (frames - 1) // 4 * 4 + 1
            raise VAEError(f"the video VAE needs 4k+1 frames (1, 5, 9, ...), got {frames}; nearest: {low} or {low + 4}")

    @torch.no_grad()
    def encode(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> scaled latents (B, T, H/8, W/8, 16). ``sample`` draws from the
        posterior with ``generator`` (as the official code); otherwise its mean is used."""
        b, c, f, h, w = pixels.shape
        self.check_frames(f)
        if h % 8 or w % 8:
            raise VAEError(f"frame size {w}x{h} is not a multiple of 8")
        x = pixels.to(self.device, self.dtype)
        if self.kind is FLUX:
            x = x[:, :, 0]
        posterior = self.model.encode(x).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mode()
        if self.kind is FLUX:
            latents = latents[:, :, None]
        return (latents.float() * self.kind.scale).permute(0, 2, 3, 4, 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, T, h, w, 16) -> pixels (B, 3, F, 8h, 8w), clamped to [-1, 1]."""
        z = (latents.float() / self.kind.scale).permute(0, 4, 1, 2, 3).to(self.device, self.dtype)
        if self.kind is FLUX:
            if z.shape[2] != 1:
                raise VAEError(f"the FLUX image VAE decodes single images, got {z.shape[2]} latent frames")
            return self.model.decode(z[:, :, 0]).sample[:, :, None].float().clamp(-1, 1)
        return self.model.decode(z).sample.float().clamp(-1, 1)


def load_vae(
    path: str | Path,
    kind: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    task_name: str | None = None,
) -> VAE:
    """Load the VAE of ``kind`` (``hunyuan`` or ``flux``); weights of the other kind are a clear error."""
    path = Path(path)
    if not path.exists():
        raise VAEError(f"VAE {path} does not exist")
    vae_kind = VAE_KINDS[kind]
    weights = _find_weights(path)
    state = read_vae_weights(weights)
    try:
        found = detect_kind(state)
    except VAEError as error:
        looks_like_dit = any(key.startswith("visual_transformer_blocks.") for key in state)
        what = "a Kandinsky 5 DiT checkpoint, not a VAE" if looks_like_dit else str(error)
        raise VAEError(f"VAE {weights}: {what}; expected {vae_kind.description}") from None
    if found != kind:
        needed = f"task {task_name!r} needs" if task_name else "this needs"
        raise VAEError(f"{weights} is {VAE_KINDS[found].description}, but {needed} {vae_kind.description}")
    config = _config(vae_kind, weights)
    if kind == "hunyuan" and is_comfy_layout(state):
        state = comfy_to_diffusers(state)
    if kind == "flux" and BFL_FLUX_KEY in state:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        state = convert_ldm_vae_checkpoint(state, {**FLUX.default_config, **config})
    with init_empty_weights():
        model = vae_kind.model_class.from_config(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise VAEError(f"{weights} does not fit its VAE config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, shape in ((k, v.shape) for k, v in model.state_dict().items()):
        if state[key].shape != shape:
            raise VAEError(f"{weights}: {key!r} has shape {list(state[key].shape)}, the config expects {list(shape)}")
    model.load_state_dict(state, assign=True)
    torch.nn.Module.to(model, device=device, dtype=dtype)  # diffusers' own .to() warns about fp32 modules it lacks
    model.eval().requires_grad_(False)
    return VAE(model, vae_kind)
