"""A HunyuanVideo VAE saved in ComfyUI's own key layout loads and gives the same results."""

import json

import torch
from safetensors.torch import load_file, save_file

from kandinsky5.encoders.vae import load_vae


def comfy_layout(state: dict) -> dict:
    """diffusers' names -> ComfyUI's, as ComfyUI's conversion table (comfy/diffusers_convert.py,
    convert_vae_state_dict) renames a VAE when it loads one: plain substring replacements, the attention
    parts only in attention keys, and attention weights reshaped to 1x1x1 convolutions for a 3-D VAE."""
    table = [
        ("nin_shortcut", "conv_shortcut"),
        ("norm_out", "conv_norm_out"),
        ("mid.attn_1.", "mid_block.attentions.0."),
    ]
    for i in range(4):
        table += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(2)]
        if i < 3:
            table += [(f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."),
                      (f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0.")]  # fmt: skip
        table += [(f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(3)]
    table += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
    attention = [
        ("norm.", "group_norm."),
        ("q.", "to_q."),
        ("k.", "to_k."),
        ("v.", "to_v."),
        ("proj_out.", "to_out.0."),
    ]
    out = {}
    for key, tensor in state.items():
        name = key
        for theirs, ours in table:
            name = name.replace(ours, theirs)
        if "attentions" in key:
            for theirs, ours in attention:
                name = name.replace(ours, theirs)
            if name.endswith((".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")):
                tensor = tensor.reshape(*tensor.shape, 1, 1, 1)
        out[name] = tensor.contiguous()
    return out


def test_a_comfyui_layout_hunyuan_vae_gives_the_same_latents_and_frames(tiny_tree, tmp_path):
    folder = tiny_tree / "vae"
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    comfy = comfy_layout(state)
    assert "decoder.mid.attn_1.q.weight" in comfy and "decoder.up.3.block.0.norm1.weight" in comfy
    assert comfy["decoder.mid.attn_1.q.weight"].ndim == 5 and not any("up_blocks" in k for k in comfy)
    config = json.loads((folder / "config.json").read_text())
    save_file(comfy, str(tmp_path / "hunyuan_vae_comfy.safetensors"), metadata={"config": json.dumps(config)})

    ours = load_vae(folder, "hunyuan")
    theirs = load_vae(tmp_path / "hunyuan_vae_comfy.safetensors", "hunyuan")
    for (name, a), (_, b) in zip(ours.model.state_dict().items(), theirs.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    pixels = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    latent = ours.encode(pixels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(latent, theirs.encode(pixels, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(ours.decode(latent), theirs.decode(latent))
