"""The HunyuanVideo VAE in ComfyUI's own key layout, renamed to diffusers' (which the model uses).

ComfyUI renames a diffusers-layout VAE to the layout of its own (latent-diffusion) VAE code when it
loads one, so a VAE it saves looks like this: ``encoder.down.{i}.block.{j}``, ``encoder.down.{i}.downsample``,
``{encoder,decoder}.mid.block_{1,2}``, ``mid.attn_1.{norm,q,k,v,proj_out}`` (the attention weights
shaped as 1x1x1 convolutions), ``nin_shortcut``, ``norm_out``, and the decoder's blocks numbered from
the last: its ``up.{n-1-i}`` is diffusers' ``up_blocks.{i}``. The causal convolutions' inner ``.conv``
and every other name are the same in both.
"""

from __future__ import annotations

import re

import torch

COMFY_MARKERS = ("decoder.mid.attn_1.q.weight", "encoder.mid.attn_1.q.weight", "decoder.up.0.block.0.norm1.weight")
ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
ATTENTION_WEIGHTS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


def is_comfy_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(key in state for key in COMFY_MARKERS)


def _renamed(key: str, up_blocks: int) -> str:
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    up = re.match(r"^decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.", key)
    if up:
        index = up_blocks - 1 - int(up.group(1))
        part = f"resnets.{up.group(3)}" if up.group(3) is not None else "upsamplers.0"
        key = f"decoder.up_blocks.{index}.{part}.{key[up.end() :]}"
    key = re.sub(r"\.mid\.block_(\d+)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", key)
    attention = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.", key)
    if attention:
        name = ATTENTION[attention.group(2)]
        key = f"{attention.group(1)}.mid_block.attentions.0.{name}.{key[attention.end() :]}"
    key = key.replace(".nin_shortcut.", ".conv_shortcut.")
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)


def comfy_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A HunyuanVideo VAE state dict in ComfyUI's layout, under diffusers' names and shapes."""
    up_blocks = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"^decoder\.up\.(\d+)\.", k))), default=-1)
    renamed = {}
    for key, tensor in state.items():
        name = _renamed(key, up_blocks)
        if name.endswith(ATTENTION_WEIGHTS) and tensor.ndim > 2:  # 1x1x1 convolution -> linear
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        renamed[name] = tensor
    return renamed
