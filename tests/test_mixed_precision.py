"""Mixed precision as accelerate runs it: autocast around the training loss changes nothing in the DiT.

The DiT keeps the official precision map itself (fp32 time embedding, modulations, norms, gated sums,
q/k norm and RoPE; the Linear layers in the weights' dtype), so a bf16 training forward under
``accelerator.autocast()`` computes exactly what the bf16 generation forward computes."""

import contextlib

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from dataset.config import load_dataset_config
from dataset.training_data import find_samples, load_batch
from kandinsky5.model.checkpoint import load_dit
from kandinsky5.model.dit import Modulation, TimeEmbeddings
from kandinsky5.model.tasks import get_task
from kandinsky5.training.train import training_loss
from networks.lora_kandinsky import create_network

from .dit_helpers import random_dit, random_inputs

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPUTE = [torch.bfloat16, torch.float16, torch.float32]


def lora_dit(task: str, dtype: torch.dtype):
    """A random DiT in compute dtype ``dtype`` with a LoRA whose up projections are not zero."""
    dit = random_dit(task).set_compute_dtype(dtype)
    dit.requires_grad_(False)
    network = create_network(dit, 4, 4, 0.0, None)
    with torch.no_grad():
        for module in network.loras.values():
            module.lora_up.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    network.apply_to(dit)
    network.train()
    return dit, network


def forward_and_grads(dit, network, inputs, autocast_dtype, checkpointing: str):
    dit.gradient_checkpointing = checkpointing != "none"
    dit.activation_offload = checkpointing == "offload"
    for p in network.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = dit(*inputs)
    out.float().square().mean().backward()
    return out, [p.grad.clone() for p in network.parameters() if p.requires_grad]


@pytest.mark.parametrize("dtype", COMPUTE, ids=str)
@pytest.mark.parametrize("autocast", list(AUTOCAST))
@pytest.mark.parametrize("checkpointing", ["none", "checkpoint", "offload"])
def test_autocast_changes_neither_the_forward_nor_the_lora_gradients(dtype, autocast, checkpointing):
    dit, network = lora_dit("tiny-t2v", dtype)
    x, text, pooled, time = random_inputs(dit, 2, 2, 4, 4, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    inputs = (x.to(dtype), text.to(dtype), pooled.to(dtype), time, mask)
    plain_out, plain_grads = forward_and_grads(dit, network, inputs, None, checkpointing)
    out, grads = forward_and_grads(dit, network, inputs, AUTOCAST[autocast], checkpointing)
    assert out.dtype == plain_out.dtype == dtype
    assert torch.equal(out, plain_out)
    assert len(grads) == len(plain_grads) > 0
    for a, b in zip(plain_grads, grads, strict=True):
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b)


@pytest.mark.parametrize("autocast", list(AUTOCAST))
def test_the_fp32_parts_stay_fp32_under_autocast(autocast):
    dit, _ = lora_dit("tiny-pro-t2v", AUTOCAST[autocast])
    seen = {}

    def record(module, args, output):
        seen[module] = output.dtype

    for module in dit.modules():
        if isinstance(module, TimeEmbeddings | Modulation):
            module.register_forward_hook(record)
    x, text, pooled, time = random_inputs(dit, 1, 1, 4, 4, 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=AUTOCAST[autocast]):
        dit(x.to(AUTOCAST[autocast]), text, pooled, time)
    modules = [m for m in dit.modules() if isinstance(m, TimeEmbeddings | Modulation)]
    assert len(seen) == len(modules) > 3
    assert set(seen.values()) == {torch.float32}


@contextlib.contextmanager
def mixed_precision_context(mixed_precision: str):
    """What the training loop wraps the loss in: accelerate's autocast for bf16 (on the CPU too); for
    fp16, which accelerate runs under autocast on GPUs only, the same torch.autocast it uses there."""
    if mixed_precision == "fp16":
        with torch.autocast("cpu", dtype=torch.float16):
            yield
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with Accelerator(mixed_precision=mixed_precision, cpu=True).autocast():
            yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("mixed_precision", ["bf16", "fp16"])
def test_a_training_forward_under_accelerate_equals_the_generation_forward(tiny_tree, cached_dataset, mixed_precision):
    """The DiT's inputs inside the training loss (autocast on), given again to the same model as
    generation calls it (no autocast), give the same output to the bit."""
    _, _, video_only = cached_dataset
    dtype = AUTOCAST[mixed_precision]
    task = get_task("tiny-t2v")
    dit = load_dit(tiny_tree / "model/tiny_t2v.safetensors", task, dtype=dtype)
    network = create_network(dit, 4, 4, 0.0, None)
    network.apply_to(dit)
    calls = []
    dit.register_forward_hook(lambda module, args, kwargs, out: calls.append((args, kwargs, out)), with_kwargs=True)
    (entry,) = [find_samples(d) for d in load_dataset_config(video_only)]
    with mixed_precision_context(mixed_precision):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
        training_loss(dit, load_batch(entry.samples), task, training_args(), "cpu")
    ((inputs, kwargs, training_out),) = calls
    with torch.no_grad():
        generation_out = dit(*inputs, **kwargs)
    assert training_out.dtype == dtype
    assert torch.equal(training_out, generation_out)


def training_args():
    from kandinsky5_train_network import parser

    return parser().parse_args(["--task", "tiny-t2v", "--dit", "x", "--dataset_config", "x", "--output_dir", "x"])
