"""Task presets: the architecture and the default generation settings of each Kandinsky 5 model.

A preset fixes the DiT architecture (``dit_params``, the keyword arguments of
``DiffusionTransformer3D``) and the defaults a command falls back to (resolution, frames, steps,
guidance, scheduler scale, RoPE scale, which VAE, the Qwen length, the checkpoint file name).
It never fixes the weights: ``--dit`` chooses those.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

QWEN_HIDDEN_SIZE = 3584  # Qwen2.5-VL-7B-Instruct
CLIP_HIDDEN_SIZE = 768  # CLIP ViT-L/14 text tower

NEGATIVE_PROMPT_VIDEO = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, "
    "ugly, deformed, walking backwards"
)


@dataclass(frozen=True)
class NablaParams:
    """Parameters of NABLA block-sparse attention (official configs, same for every NABLA task)."""

    P: float
    wT: int = 11
    wH: int = 3
    wW: int = 3
    add_sta: bool = True
    method: str = "topcdf"


@dataclass(frozen=True)
class TaskPreset:
    name: str
    description: str
    kind: str  # "t2v", "i2v", "t2i" or "i2i"
    dit_params: Mapping[str, Any]
    resolution: int  # the side of the square whose area the default sizes keep
    frames: int  # pixel frames (4k+1); 1 for image tasks
    steps: int
    guidance: float
    scheduler_scale: float
    rope_scale: tuple[float, float, float]
    vae: str  # "hunyuan" (video VAE) or "flux" (image VAE)
    qwen_max_length: int
    checkpoint: str  # file name the official repositories use for the DiT weights
    nabla: NablaParams | None = None
    negative_prompt: str = field(default="")
    # I2V: the first frame's latent also fills the conditioning channels at frame 0 (the distilled Pro I2V
    # checkpoint, published in the diffusers layout, was made with diffusers' pipeline, which did this)
    image_in_condition: bool = False

    @property
    def is_video(self) -> bool:
        return self.kind in ("t2v", "i2v")

    @property
    def attention(self) -> str:
        return "nabla" if self.nabla is not None else "dense"

    @property
    def size_multiple(self) -> int:
        """Pixel sides must be multiples of this (NABLA works on 8x8 tiles of 2x2 patches of 8x8 pixels)."""
        return NABLA_SIZE_MULTIPLE if self.nabla is not None else 16

    @property
    def default_checkpoint_path(self) -> str:
        """A file, or for checkpoints published in the diffusers layout only, a folder (the repository's
        ``transformer/``)."""
        return f"weights/model/{self.checkpoint}"

    @property
    def diffusers_layout(self) -> bool:
        return not self.checkpoint.endswith(".safetensors")


def _dit_params(
    model_dim: int,
    ff_dim: int,
    time_dim: int,
    num_text_blocks: int,
    num_visual_blocks: int,
    axes_dims: tuple[int, int, int],
    visual_cond: bool,
    instruct_type: str | None = None,
    in_text_dim: int = QWEN_HIDDEN_SIZE,
    in_text_dim2: int = CLIP_HIDDEN_SIZE,
) -> Mapping[str, Any]:
    return MappingProxyType(
        dict(
            in_visual_dim=16,
            out_visual_dim=16,
            in_text_dim=in_text_dim,
            in_text_dim2=in_text_dim2,
            time_dim=time_dim,
            patch_size=(1, 2, 2),
            model_dim=model_dim,
            ff_dim=ff_dim,
            num_text_blocks=num_text_blocks,
            num_visual_blocks=num_visual_blocks,
            axes_dims=axes_dims,
            visual_cond=visual_cond,
            instruct_type=instruct_type,
        )
    )


LITE_VIDEO = _dit_params(1792, 7168, 512, 2, 32, (16, 24, 24), visual_cond=True)
PRO_VIDEO = _dit_params(4096, 16384, 1024, 4, 60, (32, 48, 48), visual_cond=True)
LITE_IMAGE = _dit_params(2560, 10240, 512, 2, 50, (32, 48, 48), visual_cond=False)
LITE_IMAGE_EDIT = _dit_params(2560, 10240, 512, 2, 50, (32, 48, 48), visual_cond=False, instruct_type="channel")

SD, HD = (1.0, 2.0, 2.0), (1.0, 3.16, 3.16)
NABLA_SIZE_MULTIPLE = 128  # pixels: NABLA works on 8x8 tiles of 2x2 patches of 8x8 pixels
IMAGE_ROPE = (1.0, 1.0, 1.0)
FRAMES_5S, FRAMES_10S = 121, 241  # 24 fps, pixel frames (31 and 61 latent frames)


def _video(
    name: str, description: str, kind: str, dit: Mapping[str, Any], checkpoint: str, frames: int, **overrides: Any
) -> TaskPreset:
    values = dict(
        steps=50,
        guidance=5.0,
        scheduler_scale=10.0,
        rope_scale=SD,
        resolution=512,
        vae="hunyuan",
        qwen_max_length=256,
        negative_prompt=NEGATIVE_PROMPT_VIDEO,
    )
    values.update(overrides)
    return TaskPreset(
        name=name, description=description, kind=kind, dit_params=dit, frames=frames, checkpoint=checkpoint, **values
    )


def _image(
    name: str, description: str, kind: str, dit: Mapping[str, Any], checkpoint: str, **overrides: Any
) -> TaskPreset:
    values = dict(
        resolution=1024,
        steps=50,
        guidance=3.5,
        scheduler_scale=3.0,
        rope_scale=IMAGE_ROPE,
        vae="flux",
        qwen_max_length=512,
    )
    values.update(overrides)
    return TaskPreset(
        name=name, description=description, kind=kind, dit_params=dit, frames=1, checkpoint=checkpoint, **values
    )


N9, N8, N7 = NablaParams(P=0.9), NablaParams(P=0.8), NablaParams(P=0.7)
LITE_T2V = "kandinsky5lite_t2v_{}.safetensors"
PRO = "kandinsky5pro_{}.safetensors"

# fmt: off
_PRESETS = [
    # Lite image (6B)
    _image("k5-lite-t2i-hd", "Lite T2I, 1024 px", "t2i", LITE_IMAGE, "kandinsky5lite_t2i.safetensors"),
    _image("k5-lite-i2i-hd", "Lite I2I (image editing), 1024 px", "i2i", LITE_IMAGE_EDIT,
           "kandinsky5lite_i2i.safetensors"),
    # Lite video (2B)
    _video("k5-lite-t2v-5s-sd", "Lite T2V 5 s, SFT", "t2v", LITE_VIDEO, LITE_T2V.format("sft_5s"), FRAMES_5S),
    _video("k5-lite-t2v-10s-sd", "Lite T2V 10 s, SFT", "t2v", LITE_VIDEO, LITE_T2V.format("sft_10s"), FRAMES_10S,
           nabla=N9),
    _video("k5-lite-i2v-5s-sd", "Lite I2V 5 s", "i2v", LITE_VIDEO, "kandinsky5lite_i2v_5s.safetensors", FRAMES_5S),
    _video("k5-lite-t2v-5s-distil-sd", "Lite T2V 5 s, distilled to 16 steps", "t2v", LITE_VIDEO,
           LITE_T2V.format("distilled16steps_5s"), FRAMES_5S, steps=16, guidance=1.0, scheduler_scale=5.0),
    _video("k5-lite-t2v-10s-distil-sd", "Lite T2V 10 s, distilled to 16 steps", "t2v", LITE_VIDEO,
           LITE_T2V.format("distilled16steps_10s"), FRAMES_10S, steps=16, guidance=1.0, nabla=N9),
    _video("k5-lite-t2v-5s-nocfg-sd", "Lite T2V 5 s, CFG-distilled", "t2v", LITE_VIDEO,
           LITE_T2V.format("nocfg_5s"), FRAMES_5S, guidance=1.0),
    # (The official 10 s no-CFG config names the SFT file; the CFG-distilled file is the published nocfg_10s.)
    _video("k5-lite-t2v-10s-nocfg-sd", "Lite T2V 10 s, CFG-distilled", "t2v", LITE_VIDEO,
           LITE_T2V.format("nocfg_10s"), FRAMES_10S, guidance=1.0, nabla=N9),
    _video("k5-lite-t2v-5s-pretrain-sd", "Lite T2V 5 s, pretrain (for fine-tuning)", "t2v", LITE_VIDEO,
           LITE_T2V.format("pretrain_5s"), FRAMES_5S),
    _video("k5-lite-t2v-10s-pretrain-sd", "Lite T2V 10 s, pretrain (for fine-tuning)", "t2v", LITE_VIDEO,
           LITE_T2V.format("pretrain_10s"), FRAMES_10S, nabla=N9),
    # Pro video (19B)
    _video("k5-pro-t2v-5s-sd", "Pro T2V 5 s, 512 px", "t2v", PRO_VIDEO, PRO.format("t2v_sft_5s"), FRAMES_5S),
    _video("k5-pro-t2v-5s-hd", "Pro T2V 5 s, 1024 px", "t2v", PRO_VIDEO, PRO.format("t2v_sft_5s"), FRAMES_5S,
           rope_scale=HD, resolution=1024, nabla=N8),
    _video("k5-pro-t2v-10s-sd", "Pro T2V 10 s, 512 px", "t2v", PRO_VIDEO, PRO.format("t2v_sft_10s"), FRAMES_10S,
           nabla=N9),
    _video("k5-pro-t2v-10s-hd", "Pro T2V 10 s, 1024 px", "t2v", PRO_VIDEO, PRO.format("t2v_sft_10s"), FRAMES_10S,
           rope_scale=HD, resolution=1024, nabla=N7),
    _video("k5-pro-i2v-5s-sd", "Pro I2V 5 s, 512 px", "i2v", PRO_VIDEO, PRO.format("i2v_sft_5s"), FRAMES_5S),
    _video("k5-pro-i2v-5s-hd", "Pro I2V 5 s, 1024 px", "i2v", PRO_VIDEO, PRO.format("i2v_sft_5s"), FRAMES_5S,
           scheduler_scale=5.0, rope_scale=HD, resolution=1024, nabla=N8),
    _video("k5-pro-t2v-5s-pretrain-sd", "Pro T2V 5 s, pretrain (for fine-tuning), 512 px", "t2v", PRO_VIDEO,
           PRO.format("t2v_pretrain_5s"), FRAMES_5S),
    _video("k5-pro-t2v-10s-pretrain-sd", "Pro T2V 10 s, pretrain (for fine-tuning), 512 px", "t2v", PRO_VIDEO,
           PRO.format("t2v_pretrain_10s"), FRAMES_10S, nabla=N9),
    # Published in the diffusers layout only: the checkpoint is the repository's transformer/ folder.
    _video("k5-pro-t2v-5s-distil-sd", "Pro T2V 5 s, distilled to 16 steps, 512 px", "t2v", PRO_VIDEO,
           "kandinsky5pro_t2v_distilled_5s", FRAMES_5S, steps=16, guidance=1.0, scheduler_scale=5.0),
    _video("k5-pro-i2v-5s-distil-sd", "Pro I2V 5 s, distilled to 16 steps, 512 px", "i2v", PRO_VIDEO,
           "kandinsky5pro_i2v_distilled_5s", FRAMES_5S, steps=16, guidance=1.0, scheduler_scale=5.0,
           image_in_condition=True),
    _image("k5-lite-t2i-pretrain-hd", "Lite T2I pretrain (for fine-tuning), 1024 px", "t2i", LITE_IMAGE,
           "kandinsky5lite_t2i_pretrain"),
    _image("k5-lite-i2i-pretrain-hd", "Lite I2I pretrain (for fine-tuning), 1024 px", "i2i", LITE_IMAGE_EDIT,
           "kandinsky5lite_i2i_pretrain"),
]

# Tiny presets: the same structure at toy width, for the tests and the quick-start demo. Their text
# widths match the tiny Qwen / CLIP encoders of the tiny weights tree.
TINY_TEXT_DIM, TINY_CLIP_DIM = 32, 32
_tiny = dict(in_text_dim=TINY_TEXT_DIM, in_text_dim2=TINY_CLIP_DIM)
TINY_VIDEO = _dit_params(64, 128, 32, 2, 3, (4, 6, 6), visual_cond=True, **_tiny)
TINY_PRO_VIDEO = _dit_params(64, 128, 48, 4, 5, (4, 6, 6), visual_cond=True, **_tiny)
TINY_IMAGE = _dit_params(64, 128, 32, 2, 3, (4, 6, 6), visual_cond=False, **_tiny)
TINY_IMAGE_EDIT = _dit_params(64, 128, 32, 2, 3, (4, 6, 6), visual_cond=False, instruct_type="channel", **_tiny)
_tiny_video = dict(steps=4, resolution=64)

_PRESETS += [
    _video("tiny-t2v", "tiny T2V (Lite-shaped) for tests and the demo", "t2v", TINY_VIDEO,
           "tiny_t2v.safetensors", 9, **_tiny_video),
    _video("tiny-i2v", "tiny I2V for tests", "i2v", TINY_VIDEO, "tiny_t2v.safetensors", 9, **_tiny_video),
    _video("tiny-i2v-distil", "tiny I2V with the distilled Pro I2V's conditioning, for tests", "i2v", TINY_VIDEO,
           "tiny_t2v.safetensors", 9, image_in_condition=True, **_tiny_video),
    _video("tiny-pro-t2v", "tiny T2V (Pro-shaped: 4 text blocks) for tests", "t2v", TINY_PRO_VIDEO,
           "tiny_pro_t2v.safetensors", 9, **_tiny_video),
    _video("tiny-t2v-nabla", "tiny T2V with NABLA attention for tests", "t2v", TINY_VIDEO,
           "tiny_t2v.safetensors", 9, steps=4, resolution=128, nabla=N9),
    _image("tiny-t2i", "tiny T2I for tests", "t2i", TINY_IMAGE, "tiny_t2i.safetensors", steps=4, resolution=64),
    _image("tiny-i2i", "tiny I2I for tests", "i2i", TINY_IMAGE_EDIT, "tiny_i2i.safetensors", steps=4,
           resolution=64),
]
# fmt: on

TASKS: Mapping[str, TaskPreset] = MappingProxyType({preset.name: preset for preset in _PRESETS})
OFFICIAL_TASKS = tuple(name for name in TASKS if not name.startswith("tiny-"))


class UnknownTaskError(ValueError):
    pass


def get_task(name: str) -> TaskPreset:
    """The preset called ``name``; an unknown name raises with the closest known names."""
    try:
        return TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(TASKS), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
        raise UnknownTaskError(f"unknown task {name!r}{hint} Known tasks: {', '.join(TASKS)}") from None


def default_paths(task: TaskPreset) -> dict[str, str]:
    """Where the scripts look for the task's weights when no path is given (docs/weights.md)."""
    return {
        "dit": task.default_checkpoint_path,
        "vae": "weights/vae" if task.vae == "hunyuan" else "weights/flux/vae",
        "text_encoder_qwen": "weights/text_encoder",
        "text_encoder_clip": "weights/text_encoder2",
    }
