import json

import pytest
import torch
from safetensors.torch import save_file

from networks.lora_files import LoRAFileError, read_lora
from networks.lora_merge import merge_lora

from .dit_helpers import random_dit
from .generation_helpers import generate, sampled_latent

TARGETS = [
    "visual_transformer_blocks.0.self_attention.to_query",
    "visual_transformer_blocks.1.feed_forward.in_layer",
    "text_transformer_blocks.0.self_attention.out_layer",
]
RANK, ALPHA = 4, 2.0


def lora_weights(seed=0, dims=None):
    model = random_dit("tiny-t2v")
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name in TARGETS:
        layer = model.get_submodule(name)
        out_features, in_features = dims or (layer.out_features, layer.in_features)
        weights[name] = (torch.randn(RANK, in_features, generator=g), torch.randn(out_features, RANK, generator=g))
    return weights


def write_kohya(path, weights):
    tensors = {}
    for name, (down, up) in weights.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors.update(
            {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)}
        )
    save_file(tensors, path, metadata={"ss_network_dim": str(RANK)})


def write_peft(path, weights):
    tensors = {}
    for name, (down, up) in weights.items():
        tensors.update({f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up})
    meta = {"transformer.r": RANK, "transformer.lora_alpha": ALPHA}
    save_file(tensors, path, metadata={"lora_adapter_metadata": json.dumps(meta)})


def write_official(folder, weights):
    folder.mkdir()
    tensors = {}
    for name, (down, up) in weights.items():
        tensors.update(
            {
                f"base_model.model.{name}.lora_A.default.weight": down,
                f"base_model.model.{name}.lora_B.default.weight": up,
            }
        )
    save_file(tensors, folder / "lora.safetensors")
    (folder / "config_lora.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA, "target_modules": []}))


def test_merge_adds_scaled_up_times_down(tmp_path):
    model = random_dit("tiny-t2v")
    before = {n: model.get_submodule(n).weight.clone() for n in TARGETS}
    weights = lora_weights()
    write_kohya(tmp_path / "l.safetensors", weights)
    assert merge_lora(model, read_lora(tmp_path / "l.safetensors"), 0.5) == 3
    for name, (down, up) in weights.items():
        expected = before[name] + 0.5 * (ALPHA / RANK) * up @ down
        assert torch.allclose(model.get_submodule(name).weight, expected, atol=1e-5)


def test_the_three_layouts_read_to_the_same_lora(tmp_path):
    weights = lora_weights()
    write_kohya(tmp_path / "kohya.safetensors", weights)
    write_peft(tmp_path / "peft.safetensors", weights)
    write_official(tmp_path / "official", weights)
    kohya, peft, official = (
        read_lora(p) for p in (tmp_path / "kohya.safetensors", tmp_path / "peft.safetensors", tmp_path / "official")
    )
    assert kohya.underscored_names and not peft.underscored_names and not official.underscored_names
    assert sorted(peft.modules) == sorted(official.modules) == sorted(TARGETS)
    for name in TARGETS:
        a, b, c = kohya.modules[name.replace(".", "_")], peft.modules[name], official.modules[name]
        assert a.scale == b.scale == c.scale == ALPHA / RANK
        assert torch.equal(a.down, b.down) and torch.equal(b.up, c.up)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    weights = {n: (d * 0.3, u * 0.3) for n, (d, u) in lora_weights().items()}
    write_kohya(folder / "kohya.safetensors", weights)
    write_peft(folder / "peft.safetensors", weights)
    write_official(folder / "official", weights)
    return folder


def test_multiplier_zero_is_the_base_and_every_layout_gives_the_same_output(tiny_tree, lora_files, tmp_path):
    base = sampled_latent(tiny_tree, tmp_path, "base")
    zero = sampled_latent(
        tiny_tree, tmp_path, "zero", "--lora_weight", str(lora_files / "kohya.safetensors"), "--lora_multiplier", "0"
    )
    kohya = sampled_latent(tiny_tree, tmp_path, "kohya", "--lora_weight", str(lora_files / "kohya.safetensors"))
    peft = sampled_latent(tiny_tree, tmp_path, "peft", "--lora_weight", str(lora_files / "peft.safetensors"))
    official = sampled_latent(tiny_tree, tmp_path, "official", "--lora_weight", str(lora_files / "official"))
    assert torch.equal(zero, base)
    assert not torch.allclose(kohya, base, atol=1e-3)
    assert torch.equal(kohya, peft) and torch.equal(peft, official)


def test_a_lora_for_another_model_is_an_error(tiny_tree, tmp_path):
    stranger = {"some_other_model.block.proj": (torch.zeros(RANK, 8), torch.zeros(8, RANK))}
    write_kohya(tmp_path / "other.safetensors", stranger)
    with pytest.raises(SystemExit, match="1 of its 1 modules match no layer of this model"):
        generate(tiny_tree, "tiny-t2v", "--prompt", "x", "--lora_weight", str(tmp_path / "other.safetensors"))
    write_peft(tmp_path / "wide.safetensors", lora_weights(dims=(128, 96)))
    with pytest.raises(LoRAFileError, match="is \\[64, 64\\] in the model but \\[128, 96\\] in the LoRA"):
        merge_lora(random_dit("tiny-t2v"), read_lora(tmp_path / "wide.safetensors"))


def test_unreadable_lora_files_are_named(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(LoRAFileError, match="cannot read LoRA .*junk.safetensors"):
        read_lora(tmp_path / "junk.safetensors")
    save_file({"transformer.a.lora_A.weight": torch.zeros(2, 3)}, tmp_path / "half.safetensors")
    with pytest.raises(LoRAFileError, match="module 'a' lacks its up matrix"):
        read_lora(tmp_path / "half.safetensors")
    save_file({"weird_key": torch.zeros(2)}, tmp_path / "weird.safetensors")
    with pytest.raises(LoRAFileError, match="key 'weird_key' is not a LoRA key"):
        read_lora(tmp_path / "weird.safetensors")
