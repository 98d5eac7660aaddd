"""LoHa and LoKr files (LyCORIS's modules under kohya names, as ComfyUI reads them) merged in generation."""

import pytest
import torch
from safetensors.torch import save_file

from kandinsky5.lora_tools import main as lora_tools
from networks.lora_files import LoRAFileError, read_lora
from networks.lora_merge import merge_lora

from .dit_helpers import random_dit
from .generation_helpers import sampled_latent

LAYER = "visual_transformer_blocks.0.self_attention.to_query"  # 64 x 64 in the tiny DiT
OTHER = "text_transformer_blocks.1.feed_forward.in_layer"  # 128 x 64


def key(name: str, prefix: str = "lora_unet_") -> str:
    return prefix + name.replace(".", "_")


def loha(out_features, in_features, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return {part: torch.randn(shape, generator=g) * 0.1 for part, shape in (
        ("hada_w1_a", (out_features, rank)), ("hada_w1_b", (rank, in_features)),
        ("hada_w2_a", (out_features, rank)), ("hada_w2_b", (rank, in_features)))}  # fmt: skip


def expected_loha(parts, alpha, rank):
    return (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"]) * alpha / rank


def test_loha_and_lokr_modules_merge_as_comfyui_computes_them(tmp_path):
    g = torch.Generator().manual_seed(3)
    h = loha(64, 64, 4, seed=1)
    # LoKr: w1 whole (8 x 4), w2 a rank-2 product (16 x 16): kron gives (8*16) x (4*16), the layer's 128 x 64
    w1 = torch.randn(8, 4, generator=g)
    w2_a, w2_b = torch.randn(16, 2, generator=g), torch.randn(2, 16, generator=g)
    lokr = {"lokr_w1": w1, "lokr_w2_a": w2_a, "lokr_w2_b": w2_b}
    tensors = {f"{key(LAYER)}.{k}": v for k, v in h.items()}
    tensors[f"{key(LAYER)}.alpha"] = torch.tensor(2.0)
    tensors |= {f"{key(OTHER, 'lycoris_')}.{k}": v for k, v in lokr.items()}
    tensors[f"{key(OTHER, 'lycoris_')}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    lora = read_lora(tmp_path / "mixed.safetensors")
    assert {w.kind for w in lora.modules.values()} == {"LoHa", "LoKr"}

    model = random_dit("tiny-t2v")
    before = {n: model.get_submodule(n).weight.detach().clone() for n in (LAYER, OTHER)}
    assert merge_lora(model, lora, multiplier=0.5) == 2
    expected_h = expected_loha(h, 2.0, 4)
    expected_k = torch.kron(w1, w2_a @ w2_b) * (1.0 / 2)  # alpha / the rank of the low-rank factor
    assert expected_k.shape == (128, 64)
    torch.testing.assert_close(model.get_submodule(LAYER).weight - before[LAYER], 0.5 * expected_h)
    torch.testing.assert_close(model.get_submodule(OTHER).weight - before[OTHER], 0.5 * expected_k)


def test_lokr_with_both_factors_whole_ignores_alpha(tmp_path):
    g = torch.Generator().manual_seed(4)
    w1, w2 = torch.randn(4, 8, generator=g), torch.randn(16, 8, generator=g)
    save_file({f"{key(LAYER)}.lokr_w1": w1, f"{key(LAYER)}.lokr_w2": w2, f"{key(LAYER)}.alpha": torch.tensor(7.0)},
              str(tmp_path / "full.safetensors"))  # fmt: skip
    model = random_dit("tiny-t2v")
    before = model.get_submodule(LAYER).weight.detach().clone()
    merge_lora(model, read_lora(tmp_path / "full.safetensors"))
    torch.testing.assert_close(model.get_submodule(LAYER).weight - before, torch.kron(w1, w2))


def test_generation_takes_a_lokr_file_with_its_multiplier(tiny_tree, tmp_path):
    g = torch.Generator().manual_seed(5)
    lokr = {"lokr_w1": torch.randn(8, 8, generator=g), "lokr_w2": torch.randn(8, 8, generator=g) * 0.05}
    save_file({f"{key(LAYER)}.{k}": v for k, v in lokr.items()}, str(tmp_path / "style.safetensors"))
    file = str(tmp_path / "style.safetensors")
    base = sampled_latent(tiny_tree, tmp_path, "base", "--no_expand_prompt")
    zero = sampled_latent(tiny_tree, tmp_path, "zero", "--no_expand_prompt", "--lora_weight", file,
                          "--lora_multiplier", "0")  # fmt: skip
    full = sampled_latent(tiny_tree, tmp_path, "full", "--no_expand_prompt", "--lora_weight", file)
    assert torch.equal(zero, base) and not torch.allclose(full, base, atol=1e-4)


def test_layouts_that_cannot_hold_them_are_named(tmp_path, capsys):
    save_file({f"{key(LAYER)}.{k}": v for k, v in loha(64, 64, 2, seed=2).items()}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(SystemExit) as stop:
        lora_tools(["to-diffusers", str(tmp_path / "loha.safetensors"), str(tmp_path / "out.safetensors")])
    said = str(stop.value.code) + capsys.readouterr().err
    assert "holds LoHa modules, which the diffusers/PEFT layout cannot hold" in said
    assert not (tmp_path / "out.safetensors").exists()
    dora = {f"{key(LAYER)}.lora_down.weight": torch.zeros(2, 64), f"{key(LAYER)}.lora_up.weight": torch.zeros(64, 2),
            f"{key(LAYER)}.dora_scale": torch.ones(1, 64)}  # fmt: skip
    save_file(dora, str(tmp_path / "dora.safetensors"))
    with pytest.raises(SystemExit) as stop:
        lora_tools(["to-diffusers", str(tmp_path / "dora.safetensors"), str(tmp_path / "out.safetensors")])
    assert "is DoRA (dora_scale, a magnitude per input column" in str(stop.value.code) + capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
    # a magnitude per output row (PEFT's shape) is named, not merged along the wrong axis
    save_file(dora | {f"{key(LAYER)}.dora_scale": torch.ones(64, 1)}, str(tmp_path / "rows.safetensors"))
    with pytest.raises(LoRAFileError, match=r"has dora_scale \[64, 1\]; expected \(1, in_features\)"):
        read_lora(tmp_path / "rows.safetensors")
