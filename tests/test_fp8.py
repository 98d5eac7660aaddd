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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_cpu_bit_conversion_equals_the_float8_cast_for_every_e4m3_value(dtype):
    # all 254 finite e4m3 bit patterns (subnormals, both zeros, negatives), in blocks with varied scales
    patterns = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    quantized = patterns.repeat(4).view(8, 127).view(FP8_DTYPE)
    for scale in (torch.rand(8, 1) * 1e-3 + 1e-6, torch.rand(8, 1) * 3 + 1):
        expected = quantized.to(dtype) * scale.to(dtype)  # PyTorch's own float8 cast
        assert torch.equal(dequantize_weight(quantized, scale, dtype), expected)
        scratch = torch.full((quantized.numel() * dtype.itemsize,), 255, dtype=torch.uint8)
        assert torch.equal(dequantize_weight(quantized, scale, dtype, scratch), expected)
    huge = torch.full((8, 1), 1e3)  # scale * 2**120 would overflow bf16: the plain cast is used
    assert torch.equal(dequantize_weight(quantized, huge, dtype), quantized.to(dtype) * huge.to(dtype))


def test_fp8_linear_gives_the_same_output_with_and_without_autograd():
    layers = [FP8Linear.from_linear(nn.Linear(128, n)) for n in (64, 32)]
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with_grad = [layer(x.clone().requires_grad_(True)) for layer in layers]
    with torch.no_grad():
        outputs = [layer(x) for layer in layers]
        again = [layer(x) for layer in layers]  # the shared buffer now holds the other layer's weight
    for a, b, c in zip(with_grad, outputs, again, strict=True):
        assert torch.equal(a.detach(), b) and torch.equal(b, c)
