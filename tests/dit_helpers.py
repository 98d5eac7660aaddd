"""Shared test helpers: random DiT weights and inputs, and diffusers' model as an oracle."""

from __future__ import annotations

import torch
from diffusers import Kandinsky5Transformer3DModel

from kandinsky5.model.dit import DiffusionTransformer3D
from kandinsky5.model.tasks import get_task


def random_dit(task_name: str, seed: int = 0) -> DiffusionTransformer3D:
    """A fp32 DiT of the task with every parameter random (diffusers zero-initialises modulations)."""
    generator = torch.Generator().manual_seed(seed)
    model = DiffusionTransformer3D(**get_task(task_name).dit_params).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def diffusers_dit(task_name: str, state_dict: dict[str, torch.Tensor]) -> Kandinsky5Transformer3DModel:
    """diffusers' transformer with the same weights; it has no instruct_type, I2I uses visual_cond."""
    params = dict(get_task(task_name).dit_params)
    instruct = params.pop("instruct_type")
    params["visual_cond"] = params["visual_cond"] or instruct == "channel"
    model = Kandinsky5Transformer3DModel(**params).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


def random_inputs(
    model: DiffusionTransformer3D, batch: int, frames: int, height: int, width: int, text_len: int, seed: int = 1
):
    generator = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, frames, height, width, model.in_channels, generator=generator)
    text = torch.randn(batch, text_len, cfg["in_text_dim"], generator=generator)
    pooled = torch.randn(batch, cfg["in_text_dim2"], generator=generator)
    time = torch.rand(batch, generator=generator) * 1000
    return x, text, pooled, time


def call_diffusers(model: Kandinsky5Transformer3DModel, x, text, pooled, time, rope_scale) -> torch.Tensor:
    _, t, h, w, _ = x.shape
    positions = [torch.arange(t), torch.arange(h // 2), torch.arange(w // 2)]
    return model(x, text, time, pooled, positions, torch.arange(text.shape[1]), scale_factor=rope_scale).sample


def run_diffusers(model: Kandinsky5Transformer3DModel, x, text, pooled, time, rope_scale) -> torch.Tensor:
    with torch.no_grad():
        return call_diffusers(model, x, text, pooled, time, rope_scale)
