"""Generation over several processes (``accelerate launch --num_processes N`` or torchrun) with the
DiT's visual tokens split over them (--sequence_parallel, kandinsky5/model/sequence_parallel.py).

The first process encodes the prompts and images and shares the result; every process loads the DiT
and takes part in each step with its share of the tokens (each gets the whole velocity back, so every
process holds the same latent); the first process alone decodes and writes. The other processes
print nothing: one run, one log.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

from kandinsky5.model.memory_presets import video_tokens
from kandinsky5.model.sequence_parallel import SequenceSplit, attention_heads, check_split, process_count_error
from kandinsky5.model.tasks import TaskPreset

SCRIPT = "kandinsky5_generate_video.py"
# The first process encodes prompts (with expansion: minutes) while the others wait in the exchange.
WAIT = timedelta(hours=2)


def launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_first_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def sequence_parallel_size(requested: int | None, task: TaskPreset, jobs: list) -> int:
    """The split of this run (1: none), checked against the processes launched, the DiT's heads and each
    job's token count; raises ValueError with the reason. Without the option, a run launched with
    several processes splits over all of them."""
    processes = launched_processes()
    size = requested or processes
    if size == 1 and processes == 1:
        return 1
    error = process_count_error(size, processes, SCRIPT, groups_allowed=False)
    if error:
        raise ValueError(error)
    tokens = {
        f"job {job.index + 1} ({job.width}x{job.height}, {job.frames} frames)": video_tokens(
            job.frames, job.width, job.height
        )
        for job in jobs
    }
    check_split(size, attention_heads(task.dit_params), tokens)
    return size


def start_processes(args, size: int) -> SequenceSplit:
    """Join the launched processes (NCCL on GPUs, one per process; gloo on the CPU) and return this
    process's split. ``args.device`` (and a CUDA --text_encoder_device) become this process's GPU."""
    import torch
    import torch.distributed as dist

    from kandinsky5.model.sequence_parallel import join_sequence_groups

    backend = "gloo"
    if args.device.startswith("cuda"):
        gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(gpu)
        args.device = str(gpu)
        if (args.text_encoder_device or "").startswith("cuda"):
            args.text_encoder_device = str(gpu)
        backend = "nccl"
    dist.init_process_group(backend, timeout=WAIT)
    return join_sequence_groups(size)


def share_from_first(value):
    """The first process's ``value`` in every process (the others pass None)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def leave_processes() -> None:
    """Every process has finished its DiT steps: leave the group together."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def quiet_unless_first():
    """Silence the standard output of every process but the first (errors still reach stderr)."""
    if is_first_process():
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(open(os.devnull, "w"))  # noqa: SIM115 - closed when the process ends
