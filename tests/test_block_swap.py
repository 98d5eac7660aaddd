import pytest
import torch

from networks.lora_kandinsky import create_network

from .dit_helpers import random_dit, random_inputs

SHAPES = {"tiny-t2v": 2 + 3, "tiny-pro-t2v": 4 + 5}  # text + visual blocks: Lite-shaped and Pro-shaped


@pytest.mark.parametrize("task", list(SHAPES))
def test_inference_with_every_number_of_swapped_blocks_equals_no_swap(task):
    inputs = random_inputs(random_dit(task), 1, 2, 4, 6, 5)
    with torch.no_grad():
        reference = random_dit(task)(*inputs)
    total = SHAPES[task]
    for count in range(1, total + 1):
        model = random_dit(task)
        assert model.enable_block_swap(count, "cpu") == count
        with torch.no_grad():
            assert torch.equal(model(*inputs), reference), count
        swapped = list(range(total - count, total))
        # each block is copied in while the one before it runs, and sent out when it is done
        expected = [("in", swapped[0])]
        for j, i in enumerate(swapped):
            expected += [("in", swapped[j + 1])] if j + 1 < count else []
            expected += [("out", i)]
        assert model.block_swap.log == expected
        assert max_resident(model.block_swap.log) == min(count, 2)


def max_resident(log) -> int:
    resident, most = set(), 0
    for kind, i in log:
        resident = resident | {i} if kind == "in" else resident - {i}
        most = max(most, len(resident))
    return most


def lora_loss_and_grads(task: str, swap: int, checkpointing: bool):
    torch.manual_seed(0)
    model = random_dit(task)
    model.gradient_checkpointing = checkpointing
    if swap:
        model.enable_block_swap(swap, "cpu")
    network = create_network(model, 4, 4)
    network.apply_to(model)
    with torch.no_grad():
        for lora in network.loras.values():
            lora.lora_up.weight.normal_(0, 0.05)
    for _ in range(2):  # two steps: the second starts with blocks the first backward left behind
        network.zero_grad()
        loss = model(*random_inputs(model, 2, 2, 4, 4, 5)).square().mean()
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in network.named_parameters()}, model


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("task", list(SHAPES))
def test_training_gradients_with_block_swap_equal_those_without(task, checkpointing):
    reference_loss, reference_grads, _ = lora_loss_and_grads(task, 0, checkpointing)
    total = SHAPES[task]
    for count in range(1, total + 1):
        loss, grads, model = lora_loss_and_grads(task, count, checkpointing)
        assert torch.equal(loss, reference_loss), count
        for name, grad in reference_grads.items():
            assert torch.allclose(grads[name], grad, rtol=1e-6, atol=1e-9), (count, name)
        swapped = list(range(total - count, total))
        backward_ins = [i for kind, i in model.block_swap.log[2 * count : 3 * count + count] if kind == "in"][:count]
        assert backward_ins == swapped[::-1]  # backward brings the blocks back in reverse order


def test_too_many_blocks_are_clamped_with_a_warning():
    model = random_dit("tiny-t2v")
    with pytest.warns(UserWarning, match="--blocks_to_swap 40 is more than the 5 blocks; swapping 5"):
        assert model.enable_block_swap(40, "cpu") == 5


def test_generation_with_block_swap_gives_the_same_video(tiny_tree, tmp_path):

    from .generation_helpers import sampled_latent

    assert torch.equal(
        sampled_latent(tiny_tree, tmp_path, "plain"),
        sampled_latent(tiny_tree, tmp_path, "swapped", "--blocks_to_swap", "3"),
    )
    fp8 = sampled_latent(tiny_tree, tmp_path, "fp8", "--fp8_base")
    with pytest.warns(UserWarning, match="more than the 5 blocks"):
        assert torch.equal(
            sampled_latent(tiny_tree, tmp_path, "swapped_fp8", "--blocks_to_swap", "50", "--fp8_base"), fp8
        )


@pytest.mark.parametrize("swap", [0, 3])
def test_activation_offload_gives_the_same_gradients_as_plain_checkpointing(swap):
    def run(offload: bool):
        torch.manual_seed(0)
        model = random_dit("tiny-t2v")
        model.gradient_checkpointing, model.activation_offload = True, offload
        if swap:
            model.enable_block_swap(swap, "cpu")
        network = create_network(model, 4, 4, network_dropout=0.3)  # dropout: the recompute must repeat it
        network.apply_to(model)
        network.train()
        with torch.no_grad():
            for lora in network.loras.values():
                lora.lora_up.weight.normal_(0, 0.05)
        loss = model(*random_inputs(model, 2, 2, 4, 4, 5)).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in network.named_parameters()}

    (plain_loss, plain), (offload_loss, offloaded) = run(False), run(True)
    assert torch.equal(plain_loss, offload_loss)
    assert all(offloaded[n] is not None for n in plain)  # also the first text block, whose input needs no grad
    assert all(torch.allclose(plain[n], offloaded[n], rtol=1e-5, atol=1e-7) for n in plain)  # summation order only


def test_offloaded_checkpoint_keeps_its_inputs_off_the_device_graph():
    from modules.activation_offload import _OffloadedCheckpoint, checkpoint_with_offload

    x = torch.randn(3, 4, requires_grad=True)
    layer = torch.nn.Linear(4, 4)
    out = checkpoint_with_offload(lambda t: layer(t).tanh(), x)
    assert isinstance(out.grad_fn, _OffloadedCheckpoint._backward_cls)
    stored = out.grad_fn.stored[0]
    assert stored.data_ptr() != x.data_ptr() and not stored.requires_grad  # a separate host copy
    out.sum().backward()
    expected = torch.autograd.grad(layer(x).tanh().sum(), x)[0]
    assert torch.allclose(x.grad, expected)
