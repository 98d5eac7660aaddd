"""Run by tests/test_sequence_parallel.py under torchrun: the tiny DiT with its visual tokens split over
the processes, against the same DiT in one process. ``forward`` prints the largest output difference;
``grad`` the largest relative difference (in norm, per tensor) of a LoRA's gradients of a loss on the
whole output (each process's gradients averaged over the processes, as training's reduction does) to
the one-process gradients."""

import sys

import torch
import torch.distributed as dist

from kandinsky5.model.dit import DiffusionTransformer3D
from kandinsky5.model.nabla import NablaParams
from kandinsky5.model.sequence_parallel import SequenceSplit, SequenceSplitError
from kandinsky5.model.tasks import get_task
from networks.lora_kandinsky import create_network
from tests.dit_helpers import random_inputs


def tiny_dit(task: str, heads: int) -> DiffusionTransformer3D:
    """The task's tiny DiT with ``heads`` heads of 16 (the preset has 4), the same random weights everywhere."""
    params = dict(get_task(task).dit_params, model_dim=16 * heads)
    model = DiffusionTransformer3D(**params).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def lora_gradients(model, inputs, nabla) -> dict[str, torch.Tensor]:
    x, text, pooled, time = inputs
    out = model(x, text, pooled, time, rope_scale=(1.0, 2.0, 2.0), nabla=nabla)
    loss = (out - x[..., : out.shape[-1]]).square().mean()
    grads = torch.autograd.grad(loss, [p for _, p in model.lora_parameters])
    return {name: g for (name, _), g in zip(model.lora_parameters, grads, strict=True)}


def main(task: str, nabla: str, mode: str = "forward", heads: str = "4") -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    model = tiny_dit(task, int(heads))
    if mode == "grad":
        network = create_network(model, 4, 4.0)
        torch.manual_seed(7)  # the LoRA's up weights random too (they start at zero), the same everywhere
        for param in network.parameters():
            param.data.normal_(0.0, 0.1)
        network.apply_to(model)
        model.lora_parameters = list(network.named_parameters())
    side = 16 if nabla == "on" else 6  # NABLA tiles 8 x 8 tokens: latent sides of 16
    frames = 3 if nabla == "on" else 4  # 3 x 8 x 8 or 4 x 3 x 3 tokens (both split over 2 and over 3)
    inputs = random_inputs(model, 2, frames, side, side, 7, seed=5)
    params = NablaParams(P=0.7) if nabla == "on" else None
    if mode == "forward":
        with torch.no_grad():
            whole = model(*inputs, rope_scale=(1.0, 2.0, 2.0), nabla=params)
    else:
        whole = lora_gradients(model, inputs, params)
    try:
        model.enable_sequence_parallel(SequenceSplit(rank, size))
    except SequenceSplitError as error:
        print(f"refused: {error}")
        return
    seen = []
    model.visual_transformer_blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    if mode == "forward":
        with torch.no_grad():
            split = model(*inputs, rope_scale=(1.0, 2.0, 2.0), nabla=params)
        difference = float((split - whole).abs().max())
    else:
        split = lora_gradients(model, inputs, params)
        for grad in split.values():  # the mean over the processes, as DDP and FSDP reduce
            dist.all_reduce(grad)
            grad /= size
        difference = max(float((split[k] - whole[k]).norm() / whole[k].norm()) for k in whole)
    print(f"process {rank} of {size}: {seen[0]} tokens, largest difference {difference:.3g}\n", end="", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
