"""Training state folders: everything needed to continue a run exactly where it stopped.

    lora.safetensors    the LoRA (kohya format, with the run's metadata)
    optimizer.pt        optimizer state
    scheduler.pt        learning-rate schedule state
    rng.pt              random number generator states (noise, timesteps, dropout)
    train_state.json    step, epoch, the next batch within that epoch, a fingerprint of the data

A folder is written under a temporary name and renamed, so a crash never leaves half a state.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from modules.atomic_save import sync_tree, temporary_folder
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
    tmp = temporary_folder(folder)
    try:
        network.save(tmp / "lora.safetensors", metadata)
        _save_pt(optimizer.state_dict(), tmp / "optimizer.pt")
        _save_pt(scheduler.state_dict(), tmp / "scheduler.pt")
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        _save_pt({"torch": torch.get_rng_state(), "cuda": cuda}, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(position), indent=2))
        sync_tree(tmp)
        # an old state is moved aside, the new one renamed in, and only then the old one deleted:
        # a kill at any moment leaves a whole state under the folder's name or beside it
        old = aside(folder)
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_pt(value, path: Path) -> None:
    """torch.save, whose failed writes (a full disk) are RuntimeErrors, failing as an OSError."""
    try:
        torch.save(value, path)
    except RuntimeError as error:
        code = errno.ENOSPC if shutil.disk_usage(path.parent).free == 0 else errno.EIO
        raise OSError(code, f"{os.strerror(code)} ({error})", str(path)) from None


def aside(folder: Path) -> Path:
    """Where an old state waits while a new one is renamed in."""
    return folder.with_name(f".{folder.name}.old")


class StateError(ValueError):
    pass


def _read_position(folder: Path) -> Position:
    path = folder / STATE_FILE
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        return Position(**{name: values[name] for name in Position.__dataclass_fields__})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StateError(f"--resume {folder}: {STATE_FILE} cannot be read ({error})") from None
    except (KeyError, TypeError) as error:
        expected = ", ".join(Position.__dataclass_fields__)
        raise StateError(f"--resume {folder}: {STATE_FILE} lacks {error} (expected the keys {expected})") from None


def _load_pickle_free(folder: Path, name: str):
    """A .pt file of the state, read with weights_only (tensors and plain values: a crafted file cannot
    run code); any failure names the file."""
    try:
        return torch.load(folder / name, weights_only=True)
    except Exception as error:  # missing, truncated, or holding objects other than tensors and values
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StateError(f"--resume {folder}: {name} cannot be loaded ({reason})") from None


def load_state(folder: Path, network: LoRANetwork, optimizer, scheduler) -> tuple[Position, dict]:
    """Restore the LoRA, optimizer and schedule; returns the position and the RNG states to restore
    just before training continues. Every file is checked before anything is restored."""
    folder = Path(folder)
    if not folder.exists() and aside(folder).is_dir():  # killed while a new state was being renamed in
        print(f"note: {folder} is missing; resuming from the previous state kept at {aside(folder)}")
        folder = aside(folder)
    if not (folder / STATE_FILE).exists():
        raise StateError(f"--resume {folder}: not a training state folder (no {STATE_FILE})")
    position = _read_position(folder)
    optimizer_state, scheduler_state, rng = (
        _load_pickle_free(folder, name) for name in ("optimizer.pt", "scheduler.pt", "rng.pt")
    )
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
        raise StateError(f"--resume {folder}: rng.pt holds no random number generator state")
    network.load_weights(folder / "lora.safetensors")
    try:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    except (KeyError, ValueError, TypeError) as error:
        raise StateError(
            f"--resume {folder}: the optimizer or schedule state does not fit this run ({error})"
        ) from None
    return position, rng


def restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def remove_old(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
