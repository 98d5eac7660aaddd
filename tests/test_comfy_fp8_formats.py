"""ComfyUI's fp8 DiT files (scaled_fp8 and comfy_quant), read by their markers and compared with the
same weights in our format."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kandinsky5.model.checkpoint import CheckpointError, is_fp8_target, load_dit
from kandinsky5.model.tasks import get_task
from modules.fp8 import FP8Linear

from .dit_helpers import random_inputs
from .generation_helpers import sampled_latent

FP8 = torch.float8_e4m3fn
TASK = get_task("tiny-t2v")


def per_tensor(weight):
    """ComfyUI's quantization: one scale per tensor, s = max|W| / 448, the fp8 values W / s."""
    scale = weight.float().abs().max() / torch.finfo(FP8).max
    return (weight.float() / scale).to(FP8), scale


def comfy_files(tree, folder):
    """The tiny DiT as ComfyUI's scaled_fp8 file, as its comfy_quant file, and the same (dequantized)
    weights as a plain file of ours."""
    state = load_file(str(tree / "model/tiny_t2v.safetensors"))
    scaled = {"scaled_fp8": torch.empty(0, dtype=FP8)}  # the marker, outside the weights' prefix
    quant, plain = {}, {}
    blob = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    for key, value in state.items():
        if is_fp8_target(key) and value.ndim == 2:
            q, s = per_tensor(value)
            layer = key.removesuffix(".weight")
            scaled.update({f"model.diffusion_model.{key}": q, f"model.diffusion_model.{layer}.scale_weight": s,
                           f"model.diffusion_model.{layer}.scale_input": torch.tensor(1.0)})  # fmt: skip
            quant.update({key: q, f"{layer}.weight_scale": s, f"{layer}.comfy_quant": blob.clone(),
                          f"{layer}.input_scale": torch.tensor(1.0)})  # fmt: skip
            plain[key] = q.float() * s
        else:
            scaled[f"model.diffusion_model.{key}"], quant[key], plain[key] = value, value, value
    paths = {name: folder / f"{name}.safetensors" for name in ("scaled", "quant", "plain")}
    for name, tensors in (("scaled", scaled), ("quant", quant), ("plain", plain)):
        save_file(tensors, str(paths[name]))
    return paths


@pytest.fixture(scope="module")
def files(tiny_tree, tmp_path_factory):
    return comfy_files(tiny_tree, tmp_path_factory.mktemp("comfy_fp8"))


@pytest.mark.parametrize("name", ["scaled", "quant"])
def test_comfyui_fp8_files_load_as_fp8_and_compute_their_dequantized_weights(tiny_tree, files, name):
    model = load_dit(files[name], TASK, dtype=torch.float32)
    fp8_layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    quantized = [k for k in load_file(str(files["quant"])) if k.endswith(".weight_scale")]
    assert len(fp8_layers) == len(quantized) > 0  # every quantized Linear of the file, kept in fp8
    reference = load_dit(files["plain"], TASK, dtype=torch.float32)
    original = load_dit(tiny_tree / "model/tiny_t2v.safetensors", TASK, dtype=torch.float32)
    inputs = random_inputs(original, 1, 2, 4, 4, 5, seed=3)
    with torch.no_grad():
        out, expected, exact = model(*inputs), reference(*inputs), original(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)  # the same weights, dequantized on the fly
    # and within fp8 rounding of the unquantized model: e4m3's 3 mantissa bits, 2**-4 relative per weight
    assert (out - exact).norm() / exact.norm() < 0.1


def test_generation_with_a_comfyui_fp8_file_equals_the_dequantized_weights(tiny_tree, files, tmp_path):
    comfy = sampled_latent(tiny_tree, tmp_path, "comfy", "--dit", str(files["scaled"]), "--no_expand_prompt")
    plain = sampled_latent(tiny_tree, tmp_path, "plain", "--dit", str(files["plain"]), "--no_expand_prompt")
    torch.testing.assert_close(comfy, plain, rtol=1e-5, atol=1e-5)


def test_fp8_files_without_a_marker_or_with_two_or_an_unknown_format_are_named(files, tmp_path):
    scaled = load_file(str(files["scaled"]))
    no_marker = {k: v for k, v in scaled.items() if k != "scaled_fp8"}
    save_file(no_marker, str(tmp_path / "bare.safetensors"))
    with pytest.raises(CheckpointError, match=r"bare\.safetensors holds fp8 scales .* but no marker"):
        load_dit(tmp_path / "bare.safetensors", TASK)
    save_file(scaled, str(tmp_path / "both.safetensors"), metadata={"fp8_format": "block-scaled"})
    with pytest.raises(CheckpointError, match=r"both\.safetensors carries the markers of several fp8 formats"):
        load_dit(tmp_path / "both.safetensors", TASK)
    quant = load_file(str(files["quant"]))
    key = next(k for k in quant if k.endswith(".comfy_quant"))
    quant[key] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    save_file(quant, str(tmp_path / "nvfp4.safetensors"))
    with pytest.raises(CheckpointError, match=r"is quantized as 'nvfp4'; only float8_e4m3fn"):
        load_dit(tmp_path / "nvfp4.safetensors", TASK)
