"""Run by tests/test_sequence_parallel.py under torchrun: the tiny DiT's output with its visual tokens
split over the processes, against the same DiT in one process; prints the largest difference."""

import sys

import torch
import torch.distributed as dist

from kandinsky5.model.nabla import NablaParams
from kandinsky5.model.sequence_parallel import SequenceSplit, SequenceSplitError
from tests.dit_helpers import random_dit, random_inputs


def main(task: str, nabla: str) -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    model = random_dit(task, seed=3)  # the same weights in every process
    height = width = 16 if nabla == "on" else 6  # NABLA tiles 8 x 8 tokens: latent sides of 16
    x, text, pooled, time = random_inputs(model, 2, 4, height, width, 7, seed=5)  # 4 x 3 x 3 or 4 x 8 x 8 tokens
    params = NablaParams(P=0.7) if nabla == "on" else None
    with torch.no_grad():
        whole = model(x, text, pooled, time, rope_scale=(1.0, 2.0, 2.0), nabla=params)
        try:
            model.enable_sequence_parallel(SequenceSplit(rank, size))
        except SequenceSplitError as error:
            print(f"refused: {error}")
            return
        seen = []
        model.visual_transformer_blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
        split = model(x, text, pooled, time, rope_scale=(1.0, 2.0, 2.0), nabla=params)
    print(f"process {rank} of {size}: {seen[0]} tokens, largest difference {float((split - whole).abs().max()):.3g}\n",
          end="", flush=True)  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
