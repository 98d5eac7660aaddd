"""The fp32 steps of a block (kandinsky5/model/fp32_steps.py) against the same steps left to autograd."""

import pytest
import torch
import torch.nn.functional as F

from kandinsky5.model.fp32_steps import gated_add, modulate, rms_norm_rotate
from kandinsky5.model.rope import rotation, visual_angles

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# each step computes the same with accelerate's autocast around it (bf16 or fp16) as without
AUTOCAST = [None, torch.bfloat16, torch.float16]
EPS = 1e-5


def chain_norm_rotate(norm, x, rope, dtype):
    """RMSNorm, rotation and rounding as autograd chains them (and as the model did before)."""
    out = F.rms_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.eps)
    if rope is not None:
        out = torch.view_as_real(torch.view_as_complex(out.unflatten(-1, (-1, 2))) * rope).flatten(-2)
    return out.to(dtype)


def chain_modulate(x, shift, scale):
    return torch.addcmul(shift, F.layer_norm(x.float(), x.shape[-1:], eps=EPS), 1.0 + scale).to(x.dtype)


def chain_gated_add(x, gate, update):
    return torch.addcmul(x.float(), gate, update.float()).to(x.dtype)


def random(shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run(step, inputs, grad, autocast=None):
    """``step``'s output and the gradients of every input that needs one, for output gradient ``grad``,
    the forward under ``autocast`` (a dtype) when given; checks that the output is the same without
    autograd and that neither the inputs nor ``grad`` were changed in place."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    before = [t.detach().clone() for t in leaves] + [grad.clone()]
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        with torch.no_grad():
            untracked = step(*leaves)
        out = step(*leaves)
    assert torch.equal(out, untracked)
    out.backward(grad)
    for original, now in zip(before, [*leaves, grad], strict=True):
        assert torch.equal(original, now.detach()), "an input or the output gradient was changed in place"
    return out, [t.grad for t in leaves if t.requires_grad]


def assert_same(expected, got, dtype):
    (out_a, grads_a), (out_b, grads_b) = expected, got
    assert out_b.dtype == out_a.dtype and torch.equal(out_a, out_b)  # the forward: the same bits
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b, a, **tolerance)


@pytest.mark.parametrize("autocast", AUTOCAST, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("train_weight", [True, False])
def test_rms_norm_rotate_equals_the_autograd_chain(dtype, rotate, train_weight, autocast):
    norm = torch.nn.RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(random(64, seed=1) * 0.3 + 1)
    norm.weight.requires_grad_(train_weight)
    rope = rotation(visual_angles((2, 3, 4), (16, 24, 24), (1.0, 2.0, 2.0), "cpu")) if rotate else None
    packed = random((2, 24, 3 * 128), dtype).requires_grad_(True)  # q of a packed q/k/v: a strided view
    grad = random((2, 24, 2, 64), dtype, seed=2)
    results = []
    for step, under in ((chain_norm_rotate, None), (rms_norm_rotate, autocast)):
        norm.weight.grad = None

        def apply(packed, step=step):
            return step(norm, packed[..., :128].unflatten(-1, (2, 64)), rope, dtype)

        out, grads = run(apply, [packed], grad, under)
        results.append((out, grads + ([norm.weight.grad] if train_weight else [])))
    assert_same(*results, dtype)


@pytest.mark.parametrize("autocast", AUTOCAST, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("train_modulation", [True, False])
def test_modulate_equals_the_autograd_chain(dtype, train_modulation, autocast):
    x = random((2, 20, 96), dtype).requires_grad_(True)
    shift, scale = (random((2, 1, 96), seed=s).requires_grad_(train_modulation) for s in (3, 4))
    grad = random((2, 20, 96), dtype, seed=5)
    chain = run(chain_modulate, [x, shift, scale], grad)
    ours = run(lambda x, shift, scale: modulate(x, shift, scale, EPS), [x, shift, scale], grad, autocast)
    assert_same(chain, ours, dtype)


@pytest.mark.parametrize("autocast", AUTOCAST, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("train_gate", [True, False])
def test_gated_add_equals_the_autograd_chain_and_passes_the_residual_gradient_on(dtype, train_gate, autocast):
    x, update = (random((2, 20, 96), dtype, seed=s).requires_grad_(True) for s in (6, 7))
    gate = random((2, 1, 96), seed=8).requires_grad_(train_gate)
    grad = random((2, 20, 96), dtype, seed=9)
    chain = run(chain_gated_add, [x, gate, update], grad)
    ours = run(gated_add, [x, gate, update], grad, autocast)
    assert_same(chain, ours, dtype)
    assert torch.equal(ours[1][0], grad)  # the residual stream's gradient is the output's, exactly


def test_backward_keeps_no_fp32_copy_of_a_bf16_activation():
    """Autograd's chains keep fp32 copies of their bf16 inputs for the backward; the fused steps keep
    the bf16 input and per-row statistics only."""
    rope = rotation(visual_angles((1, 4, 4), (16, 24, 24), (1.0, 1.0, 1.0), "cpu"))
    norm = torch.nn.RMSNorm(64)
    x = random((1, 16, 128), torch.bfloat16).requires_grad_(True)
    shift, scale, gate = (random((1, 1, 128), seed=s) for s in (1, 2, 3))

    def block_steps(norm_rotate, modulate_step, add):
        out = modulate_step(x, shift, scale)
        q = norm_rotate(norm, out.unflatten(-1, (2, 64)), rope, torch.bfloat16)
        return add(x, gate, q.flatten(-2))

    def kept_fp32(steps) -> int:
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            steps()
        return sum(t.numel() for t in saved if t.dtype == torch.float32 and t.numel() >= x.numel())

    chain = kept_fp32(lambda: block_steps(chain_norm_rotate, chain_modulate, chain_gated_add))
    assert chain >= 2 * x.numel()  # the test sees what autograd keeps
    assert kept_fp32(lambda: block_steps(rms_norm_rotate, lambda *a: modulate(*a, EPS), gated_add)) == 0
