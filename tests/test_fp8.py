import pytest
import torch
from torch import nn

from modules.fp8 import FP8_DTYPE, FP8Linear, dequantize_weight, quantize_linears, quantize_weight


@pytest.mark.parametrize("shape,block", [((96, 128), 64), ((40, 128), 16), ((32, 100), 64)])
def test_quantized_weights_are_within_the_e4m3_error(shape, block):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    quantized, scale = quantize_weight(weight, block)
    assert quantized.dtype == FP8_DTYPE and quantized.shape == weight.shape
    assert scale.shape == ((shape[0], shape[1] // block, 1) if shape[1] % block == 0 else (shape[0], 1))
    restored = dequantize_weight(quantized, scale, torch.float32)
    blocks = (weight - restored).view(shape[0], -1, block if shape[1] % block == 0 else shape[1])
    reference = weight.view_as(blocks)
    relative_rms = blocks.norm(dim=-1) / reference.norm(dim=-1)
    # e4m3 keeps 3 mantissa bits: about 2.5 % RMS error; single 64-value blocks scatter around it
    assert relative_rms.mean() < 0.03 and relative_rms.max() < 0.04
    assert (restored.abs().amax(dim=-1) <= weight.abs().amax(dim=-1) * 1.07).all()


def test_fp8_linear_matches_the_dequantized_matmul_and_halves_memory():
    linear = nn.Linear(128, 64)
    fp8 = FP8Linear.from_linear(linear)
    x = torch.randn(3, 128)
    expected = x @ dequantize_weight(fp8.weight, fp8.scale_weight, torch.float32).T + linear.bias
    assert torch.allclose(fp8(x), expected, atol=1e-6)
    assert (fp8(x) - linear(x)).norm() / linear(x).norm() < 0.05
    assert fp8.weight.element_size() == 1 and fp8(x.bfloat16()).dtype == torch.bfloat16


def test_quantize_linears_replaces_only_the_chosen_layers():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)))
    assert quantize_linears(model, lambda name: name.startswith("2.")) == 2
    assert isinstance(model[0], nn.Linear) and isinstance(model[2][0], FP8Linear) and isinstance(model[2][1], FP8Linear)
    assert model(torch.randn(2, 64)).shape == (2, 8)
