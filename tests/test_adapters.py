"""LoHa, LoKr and DoRA trained here: the network's forward equals the file merged as ComfyUI merges it,
every key of the file is one ComfyUI loads, and generation and lora_tools merge take the files."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from kandinsky5.lora_tools import main as lora_tools
from kandinsky5.model.checkpoint import load_dit, save_dit
from kandinsky5.model.tasks import get_task
from networks import loha_kandinsky, lokr_kandinsky, lora_kandinsky
from networks.adapter_network import AdapterNetwork
from networks.lora_files import LoRAFileError, read_lora
from networks.lora_merge import merge_lora, merge_plan

from .comfy_adapters import comfy_key_map, comfy_load, comfy_weight
from .dit_helpers import random_dit, random_inputs

VARIANTS = {
    "lora-dora": (lora_kandinsky, ["dora_wd=True"]),
    "loha": (loha_kandinsky, []),
    "loha-dora": (loha_kandinsky, ["dora_wd=True"]),
    "lokr-low-rank": (lokr_kandinsky, ["factor=4"]),  # 64 = 4 x 16: rank 4 < 16 / 2, w2 is w2_a @ w2_b
    "lokr-whole": (lokr_kandinsky, []),  # 64 = 8 x 8: rank 4 >= 8 / 2, w2 whole (the feed-forward's 128: low rank)
    "lokr-dora": (lokr_kandinsky, ["dora_wd=True", "factor=4"]),
}


def trained_network(dit, variant: str, seed: int = 0) -> AdapterNetwork:
    """A network of ``variant`` on ``dit`` with every tensor moved away from its start, as after training."""
    module, network_args = VARIANTS[variant]
    network = module.create_network(dit, 4, 2.0, network_args=network_args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.05 if "dora_scale" not in name else 0.2))
    return network


def dit_output(dit, seed=1) -> torch.Tensor:
    x, text, pooled, time = random_inputs(dit, 1, 2, 4, 4, 5, seed=seed)
    with torch.no_grad():
        return dit(x, text, pooled, time, rope_scale=(1.0, 2.0, 2.0))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_file_merged_as_comfyui_merges_it_is_the_network_trained(variant, tmp_path):
    dit = random_dit("tiny-t2v")
    base = copy.deepcopy(dit)
    network = trained_network(dit, variant)
    network.eval().apply_to(dit)
    trained_output = dit_output(dit)
    network.save(tmp_path / "adapter.safetensors", {})
    file = load_file(str(tmp_path / "adapter.safetensors"))

    # ComfyUI's key handling finds every module and loads every key
    patches, unloaded = comfy_load(file, comfy_key_map(list(base.state_dict())))
    assert not unloaded
    assert len(patches) == len(network.loras) == 2 * 6 + 3 * 10
    kind = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}
    assert {kind[p[0]] for p in patches.values()} == {network.kind}
    assert all((p[3] is not None) == ("dora" in variant) for p in patches.values())

    # ComfyUI's weights at strength 1 give the trained network's output; ours equal ComfyUI's at any strength
    comfy = copy.deepcopy(base)
    for key, patch in patches.items():
        layer = comfy.get_submodule(key[len("diffusion_model.") : -len(".weight")])
        with torch.no_grad():
            layer.weight.copy_(comfy_weight(patch, layer.weight, 1.0))
    torch.testing.assert_close(dit_output(comfy), trained_output, rtol=1e-5, atol=1e-5)
    ours = copy.deepcopy(base)
    merge_lora(ours, read_lora(tmp_path / "adapter.safetensors"), multiplier=0.6)
    for key, patch in patches.items():
        name = key[len("diffusion_model.") : -len(".weight")]
        expected = comfy_weight(patch, base.get_submodule(name).weight, 0.6)
        torch.testing.assert_close(ours.get_submodule(name).weight, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["loha", "lokr-dora"])
def test_generation_loading_and_lora_tools_merge_equal_the_merge(variant, tmp_path):
    task = get_task("tiny-t2v")
    dit = random_dit("tiny-t2v")
    save_dit(dit, tmp_path / "dit.safetensors")
    network = trained_network(dit, variant, seed=3)
    network.save(tmp_path / "adapter.safetensors", {})
    lora = read_lora(tmp_path / "adapter.safetensors")
    shapes = {n: tuple(m.weight.shape) for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)}
    loaded = load_dit(tmp_path / "dit.safetensors", task, dtype=torch.float32,
                      deltas=merge_plan([(lora, 0.8)], shapes))  # fmt: skip
    lora_tools(["merge", "--dit", str(tmp_path / "dit.safetensors"), "--lora", str(tmp_path / "adapter.safetensors"),
                "--multiplier", "0.8", "--output", str(tmp_path / "merged.safetensors")])  # fmt: skip
    merged = load_file(str(tmp_path / "merged.safetensors"))
    patches, _ = comfy_load(load_file(str(tmp_path / "adapter.safetensors")), comfy_key_map(list(dit.state_dict())))
    for key, patch in patches.items():
        name = key[len("diffusion_model.") : -len(".weight")]
        expected = comfy_weight(patch, dit.get_submodule(name).weight, 0.8)
        torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded.get_submodule(name).weight, expected, rtol=1e-5, atol=1e-6)
    untouched = "visual_transformer_blocks.0.visual_modulation.out_layer.weight"
    assert torch.equal(merged[untouched], dit.state_dict()[untouched])


def test_kohya_conversion_keeps_lycoris_and_dora_parts_and_peft_refuses_them(tmp_path, capsys):
    dit = random_dit("tiny-t2v")
    trained_network(dit, "lokr-dora").save(tmp_path / "lokr.safetensors", {})
    lora_tools(["to-kohya", str(tmp_path / "lokr.safetensors"), str(tmp_path / "again.safetensors")])
    before, after = load_file(str(tmp_path / "lokr.safetensors")), load_file(str(tmp_path / "again.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(SystemExit) as stop:
        lora_tools(["to-official", str(tmp_path / "lokr.safetensors"), str(tmp_path / "official")])
    assert "holds LoKr modules, which the official layout cannot hold" in str(stop.value.code)


def test_network_weights_continue_the_same_kind_and_name_another(tmp_path):
    dit = random_dit("tiny-t2v")
    trained_network(dit, "loha").save(tmp_path / "loha.safetensors", {})
    again = loha_kandinsky.create_network(random_dit("tiny-t2v"), 4, 2.0)
    again.load_weights(tmp_path / "loha.safetensors")
    saved = load_file(str(tmp_path / "loha.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in again.kohya_state_dict().items())
    with pytest.raises(LoRAFileError, match="holds LoHa modules; this run trains LoKr"):
        lokr_kandinsky.create_network(random_dit("tiny-t2v"), 4, 2.0).load_weights(tmp_path / "loha.safetensors")
    with pytest.raises(
        LoRAFileError, match="in_layer.hada_w1_a is \\[128, 4\\], the network's \\[128, 8\\] \\(set --network_dim 4"
    ):
        loha_kandinsky.create_network(random_dit("tiny-t2v"), 8, 2.0).load_weights(tmp_path / "loha.safetensors")
    with pytest.raises(LoRAFileError, match="with dora_wd"):
        loha_kandinsky.create_network(random_dit("tiny-t2v"), 4, 2.0, network_args=["dora_wd=True"]).load_weights(
            tmp_path / "loha.safetensors"
        )


@pytest.mark.parametrize("variant", ["loha", "lokr-low-rank", "lokr-whole", "lora-dora"])
def test_max_norm_scales_the_update_to_the_bound(variant):
    dit = random_dit("tiny-t2v")
    network = trained_network(dit, variant)
    before = {n: m.delta_weight().norm().item() for n, m in network.loras.items()}
    bound = sorted(before.values())[len(before) // 2]
    scaled, _, largest = network.scale_weight_norms(bound)
    assert scaled == sum(v > bound for v in before.values()) and largest == pytest.approx(max(before.values()))
    for name, module in network.loras.items():
        assert module.delta_weight().norm().item() == pytest.approx(min(before[name], bound), rel=1e-5)


def test_lokr_splits_and_refuses_unknown_options():
    assert lokr_kandinsky.factorization(5120) == (64, 80) and lokr_kandinsky.factorization(20480) == (128, 160)
    assert lokr_kandinsky.factorization(64, 4) == (4, 16) and lokr_kandinsky.factorization(97) == (1, 97)
    with pytest.raises(ValueError, match="key one of .* factor \\(for LoKr\\)"):
        lokr_kandinsky.create_network(random_dit("tiny-t2v"), 4, 1, network_args=["loraplus_lr_ratio=4"])
