import pytest
import torch

from kandinsky5.model.dit import keeps_fp32

from .dit_helpers import call_diffusers, diffusers_dit, random_dit, random_inputs, run_diffusers

# (task, latent frames, latent height, latent width, text tokens, rope scale)
PARITY_CASES = [
    ("tiny-t2v", 1, 4, 4, 1, (1.0, 2.0, 2.0)),
    ("tiny-t2v", 3, 8, 12, 7, (1.0, 2.0, 2.0)),
    ("tiny-t2v", 5, 6, 4, 40, (1.0, 3.16, 3.16)),
    ("tiny-pro-t2v", 2, 4, 8, 13, (1.0, 2.0, 2.0)),
    ("tiny-t2i", 1, 8, 8, 9, (1.0, 1.0, 1.0)),
    ("tiny-t2i", 1, 12, 6, 30, (1.0, 1.0, 1.0)),
    ("tiny-i2i", 1, 6, 10, 5, (1.0, 1.0, 1.0)),
]


@pytest.mark.parametrize("task,frames,height,width,text_len,rope_scale", PARITY_CASES)
def test_matches_diffusers_with_the_same_weights(task, frames, height, width, text_len, rope_scale):
    ours = random_dit(task)
    theirs = diffusers_dit(task, ours.state_dict())
    inputs = random_inputs(ours, 1, frames, height, width, text_len)
    with torch.no_grad():
        out = ours(*inputs, rope_scale=rope_scale)
    expected = run_diffusers(theirs, *inputs, rope_scale)
    assert out.shape == expected.shape == (1, frames, height, width, 16)
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("task", ["tiny-t2v", "tiny-pro-t2v"])
def test_gradients_match_diffusers_for_the_input_and_every_weight(task):
    """The hand-written backwards (kandinsky5/model/fp32_steps.py) against
    autograd through diffusers' model, with every parameter trained (a full fine-tune). A few
    gradients are sums that nearly cancel (a key's bias moves every score of a query alike, which the
    softmax ignores), so each is held to the scale of the largest, and to 5% of its own."""
    ours = random_dit(task)
    theirs = diffusers_dit(task, ours.state_dict())
    x, *rest = random_inputs(ours, 2, 2, 4, 6, 5)
    target = torch.randn(x.shape[:-1] + (16,), generator=torch.Generator().manual_seed(3))
    gradients = []
    for model, call in (
        (ours, lambda x: ours(x, *rest)),
        (theirs, lambda x: call_diffusers(theirs, x, *rest, (1, 1, 1))),
    ):
        x_grad = x.clone().requires_grad_(True)
        (call(x_grad) - target).square().mean().backward()
        gradients.append({n: p.grad for n, p in model.named_parameters()})
        gradients[-1]["input"] = x_grad.grad
    ours_grads, expected_grads = gradients
    assert ours_grads.keys() == expected_grads.keys()
    assert all(g is not None for g in [*ours_grads.values(), *expected_grads.values()])
    error = (ours_grads["input"] - expected_grads["input"]).abs().max()
    assert error <= 1e-3 * expected_grads["input"].abs().max()
    largest = max(g.abs().max() for g in expected_grads.values())
    for name, expected in expected_grads.items():
        error = (ours_grads[name] - expected).abs().max()
        assert error <= 1e-4 * largest and error <= 0.05 * expected.abs().max(), name


def test_batch_with_padded_text_equals_samples_run_alone():
    model = random_dit("tiny-t2v")
    x, text, pooled, time = random_inputs(model, 2, 2, 6, 8, 11)
    lengths = [11, 4]
    mask = torch.arange(11)[None] < torch.tensor(lengths)[:, None]
    padded = text.clone()
    padded[1, 4:] = 123.0  # garbage in the padding must not matter
    with torch.no_grad():
        batched = model(x, padded, pooled, time, text_mask=mask)
        alone = [
            model(x[i : i + 1], text[i : i + 1, :n], pooled[i : i + 1], time[i : i + 1]) for i, n in enumerate(lengths)
        ]
    for i in range(2):
        assert torch.allclose(batched[i], alone[i][0], rtol=1e-5, atol=1e-5 * alone[i].abs().max())


def test_full_mask_equals_no_mask_and_scalar_time_broadcasts():
    model = random_dit("tiny-t2i")
    x, text, pooled, _ = random_inputs(model, 2, 1, 4, 4, 5)
    with torch.no_grad():
        a = model(x, text, pooled, torch.tensor([500.0]), text_mask=torch.ones(2, 5, dtype=torch.bool))
        b = model(x, text, pooled, torch.tensor([500.0, 500.0]))
    assert torch.equal(a, b)


def test_compute_dtype_keeps_the_fp32_parts_and_stays_close():
    model = random_dit("tiny-t2v")
    inputs = random_inputs(model, 1, 2, 4, 4, 6)
    with torch.no_grad():
        reference = model(*inputs)
        model.set_compute_dtype(torch.bfloat16)
        out = model(*inputs)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if keeps_fp32(name) else torch.bfloat16), name
    assert keeps_fp32("visual_transformer_blocks.0.visual_modulation.out_layer.weight")
    assert keeps_fp32("time_embeddings.in_layer.weight") and keeps_fp32("text_embeddings.norm.weight")
    assert not keeps_fp32("visual_transformer_blocks.0.self_attention.to_query.weight")
    assert out.dtype == torch.bfloat16
    error = (out.float() - reference).norm() / reference.norm()
    assert error < 0.05


def test_casting_the_whole_module_keeps_fp32_math_and_rope_tables():
    model = random_dit("tiny-t2v")
    inputs = random_inputs(model, 1, 2, 4, 4, 3)
    with torch.no_grad():
        reference = model.set_compute_dtype(torch.bfloat16)(*inputs)
        out = model.to(torch.bfloat16)(*inputs)  # fp32-kept parameters rounded to bf16 too
    assert model._rope._tables and all(table.dtype == torch.complex64 for table in model._rope._tables.values())
    assert (out.float() - reference.float()).norm() / reference.float().norm() < 0.05


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    def loss_and_grads(checkpointing: bool):
        model = random_dit("tiny-pro-t2v")
        model.gradient_checkpointing = checkpointing
        loss = model(*random_inputs(model, 2, 2, 4, 4, 5)).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_plain, grads_plain = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    assert torch.equal(loss_plain, loss_ckpt)
    for name, grad in grads_plain.items():
        assert torch.allclose(grad, grads_ckpt[name], rtol=1e-5, atol=1e-7), name


def test_visual_conditioning_channels_are_read():
    model = random_dit("tiny-t2v")
    x, text, pooled, time = random_inputs(model, 1, 2, 4, 4, 3)
    assert x.shape[-1] == 33
    conditioned = x.clone()
    conditioned[..., 16:] = 0.5
    with torch.no_grad():
        assert not torch.allclose(model(x, text, pooled, time), model(conditioned, text, pooled, time))


def test_bad_inputs_are_named():
    model = random_dit("tiny-t2v")
    x, text, pooled, time = random_inputs(model, 1, 2, 4, 4, 3)
    with pytest.raises(ValueError, match="takes 33 latent channels, got 16 "):
        model(x[..., :16], text, pooled, time)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(x[:, :, :3], text, pooled, time)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(x, text.expand(2, -1, -1), pooled, time)


def test_compiled_blocks_give_the_eager_output_and_gradients():
    model = random_dit("tiny-t2v")
    inputs = random_inputs(model, 2, 2, 4, 6, 5)
    x = inputs[0].clone().requires_grad_(True)
    eager = model(x, *inputs[1:])
    eager.square().mean().backward()
    eager_grad, x.grad = x.grad, None
    model.compile_blocks()
    compiled = model(x, *inputs[1:])
    compiled.square().mean().backward()
    assert all(block._compiled_call_impl is not None for block in model.visual_transformer_blocks)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, eager_grad, rtol=1e-4, atol=1e-4)


def test_each_block_traces_as_one_graph_for_compile(tmp_path):
    from kandinsky5.model.checkpoint import load_dit, save_dit
    from kandinsky5.model.tasks import get_task

    save_dit(random_dit("tiny-t2v"), tmp_path / "dit.safetensors")
    model = load_dit(tmp_path / "dit.safetensors", get_task("tiny-t2v"), dtype=torch.float32)  # packed q/k/v
    calls = {}
    for block in (model.text_transformer_blocks[0], model.visual_transformer_blocks[0]):
        block.register_forward_hook(lambda module, args, out: calls.setdefault(module, args) and None)
    with torch.no_grad():
        model(*random_inputs(model, 1, 2, 4, 6, 5))
    for block, args in calls.items():
        explanation = torch._dynamo.explain(block)(*args)
        assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
