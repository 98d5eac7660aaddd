"""Training with each step's visual tokens split over processes (--sequence_parallel N; the DiT's side is
kandinsky5/model/sequence_parallel.py).

The processes launched form groups of N consecutive ranks. The processes of a group train on the same
batches (the data is shared out over the groups, not the processes), draw the same noise and timesteps
(the same seed, the same draws), and each runs the blocks on its share of the tokens; every process
gets the whole prediction back and computes the same loss. The backward of that gathering sums the
group's gradients of the loss, so a process holds N times its share of the gradient of everything
before the gather and once the gradient of what follows it. The mean over all processes, which the
gradient reduction of DDP and of FSDP takes, is then the one-process gradient of each group's batch,
averaged over the groups: what data-parallel training over the groups would give.
"""

from __future__ import annotations

from kandinsky5.inference.processes import launched_processes
from kandinsky5.model.memory_presets import latent_tokens
from kandinsky5.model.sequence_parallel import attention_heads, check_split, process_count_error

SCRIPT = "kandinsky5_train_network.py"


def check_sequence_split(size: int, dit_params, datasets: list) -> str | None:
    """The reason the processes launched, the DiT's heads or a cached sample's tokens cannot be split
    over ``size`` processes (None when they can); ``datasets`` as preflight reads them."""
    error = process_count_error(size, launched_processes(), SCRIPT, groups_allowed=True)
    if error:
        return error
    tokens, seen = {}, set()
    for entry in datasets:
        for sample in entry.samples:
            if sample.shape in seen:  # one cache per bucket is named
                continue
            seen.add(sample.shape)
            frames, height, width, _ = sample.shape
            name = f"the bucket of {sample.latent_file} ({width * 8}x{height * 8} px, {frames} latent frames)"
            tokens[name] = latent_tokens(sample.shape)
    try:
        check_split(size, attention_heads(dit_params), tokens)
    except ValueError as error:
        return str(error)
    return None


def data_share(process_index: int, processes: int, size: int) -> tuple[int, int]:
    """(this process's share of the data, the number of shares): one per group of ``size`` processes."""
    return process_index // size, processes // size
