"""Training state folders: everything needed to continue a run exactly where it stopped.

    lora.safetensors    the LoRA (kohya format, with the run's metadata)
    optimizer.pt        optimizer state
    scheduler.pt        learning-rate schedule state
    rng.pt              random number generator states (noise, timesteps, dropout)
    train_state.json    step, epoch, the next batch within that epoch, a fingerprint of the data

A folder is written under a temporary name and renamed, so a crash never leaves half a state.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from networks.lora_kandinsky import LoRANetwork

STATE_FILE = "train_state.json"


@dataclass
class Position:
    step: int  # optimizer steps done
    epoch: int  # the epoch (from 1) the next batch belongs to
    next_batch: int  # index of that batch within this process's share of the epoch
    data_fingerprint: str


def save_state(
    folder: Path, network: LoRANetwork, metadata: dict[str, str], optimizer, scheduler, position: Position
) -> None:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        network.save(tmp / "lora.safetensors", metadata)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        torch.save({"torch": torch.get_rng_state(), "cuda": cuda}, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(position), indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_state(folder: Path, network: LoRANetwork, optimizer, scheduler) -> tuple[Position, dict]:
    """Restore the LoRA, optimizer and schedule; returns the position and the RNG states to restore
    just before training continues."""
    folder = Path(folder)
    if not (folder / STATE_FILE).exists():
        raise ValueError(f"--resume {folder}: not a training state folder (no {STATE_FILE})")
    position = Position(**json.loads((folder / STATE_FILE).read_text()))
    network.load_weights(folder / "lora.safetensors")
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    return position, torch.load(folder / "rng.pt", weights_only=False)


def restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def remove_old(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
