"""One process of a several-process run ending (killed, out of memory, its machine gone): the others
find the connection to it closed in their next exchange. They stop there with one message naming
themselves and the last complete state to resume from; the launcher's own report (torchrun's
"Root Cause") then names the process that ended."""

from __future__ import annotations

import re
from pathlib import Path

# what gloo and NCCL say when a peer's end of the connection is gone
LOST_PEER = re.compile(
    r"Connection (reset|closed) by peer|Broken pipe|Connection refused|NCCL.*(error|remote)|socket.*(closed|timed out)",
    re.IGNORECASE,
)


def lost_peer(error: BaseException | None) -> bool:
    return isinstance(error, RuntimeError) and bool(LOST_PEER.search(str(error)))


def last_state(output_dir: str | Path, output_name: str) -> Path | None:
    """The newest complete state folder of the run (a folder appears whole or not at all)."""
    pattern = re.compile(rf"{re.escape(output_name)}-step(\d+)-state")
    found = (pattern.fullmatch(p.name) for p in Path(output_dir).glob(f"{output_name}-step*-state"))
    states = [(int(m[1]), Path(output_dir) / m[0]) for m in found if m]
    return max(states)[1] if states else None


def lost_peer_message(error: BaseException, rank: int, processes: int, output_dir, output_name: str) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    reason = first.split("] ", 1)[-1].split(". ", 1)[0][:160]  # gloo's first sentence, without its source file
    state = last_state(output_dir, output_name)
    resume = (
        f"the last complete state is {state}: continue with --resume {state}"
        if state is not None
        else "no state was saved yet (--save_state saves one with each LoRA file)"
    )
    return (
        f"process {rank} of {processes}: another process of this run ended while this one waited for it ({reason}); "
        f"the launcher's report names it. Stopped; {resume}"
    )
