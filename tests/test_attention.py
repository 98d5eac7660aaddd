import importlib.util

import pytest
import torch

from kandinsky5.model.attention import (
    AUTO,
    AttentionBackendError,
    _sdpa,
    attention,
    auto_backend,
    check_backend,
    per_sample_attention,
)
from kandinsky5.model.dit import DiffusionTransformer3D
from kandinsky5.model.tasks import get_task


def qkv(batch=3, q_len=10, k_len=7, heads=2, dim=8):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, q_len, heads, dim, generator=g),
        torch.randn(batch, k_len, heads, dim, generator=g),
        torch.randn(batch, k_len, heads, dim, generator=g),
    )


def test_sdpa_with_a_padding_mask_ignores_padded_keys():
    q, k, v = qkv()
    lengths = [7, 3, 1]
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    out = attention(q, k, v, mask, "sdpa")
    for i, n in enumerate(lengths):
        scores = torch.einsum("qhd,khd->hqk", q[i], k[i, :n]) / 8**0.5
        expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[i, :n])
        assert torch.allclose(out[i], expected, atol=1e-5)


def test_per_sample_path_of_maskless_kernels_equals_the_masked_result():
    q, k, v = qkv()
    lengths = [7, 3, 1]
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    assert torch.allclose(per_sample_attention(_sdpa, q, k, v, lengths), _sdpa(q, k, v, mask), atol=1e-6)


def test_unknown_backend_is_an_error():
    with pytest.raises(AttentionBackendError, match="unknown attention backend 'fast'"):
        check_backend("fast")


@pytest.mark.parametrize(
    "name,module,package",
    [
        ("flash_attn", "flash_attn", "flash-attn"),
        ("flash3", "flash_attn_interface", "flash-attn 3"),
        ("xformers", "xformers", "xformers"),
        ("sage", "sageattention", "sageattention"),
    ],
)
def test_optional_backend_errors_name_what_to_install_or_that_cuda_is_needed(name, module, package):
    model = DiffusionTransformer3D(**get_task("tiny-t2v").dit_params)
    if importlib.util.find_spec(module) is None:
        with pytest.raises(AttentionBackendError, match=f"needs the package '{package}"):
            model.set_attention_backend(name)
    else:
        with pytest.raises(AttentionBackendError, match="runs only on CUDA GPUs"):
            model.set_attention_backend(name)
    assert model.attention_backend == "sdpa"


def test_without_a_flag_the_model_takes_the_fastest_installed_backend_for_its_device():
    assert auto_backend("cpu") == "sdpa"  # the CUDA kernels are never chosen for a CPU model
    model = DiffusionTransformer3D(**get_task("tiny-t2v").dit_params)
    model.attention_backend = "unset"
    assert model.set_attention_backend(AUTO) == "sdpa" and model.attention_backend == "sdpa"
