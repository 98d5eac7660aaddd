"""Training state folders: everything needed to continue a run exactly where it stopped.

    lora.safetensors    the LoRA (kohya format, with the run's metadata)
    optimizer.pt        optimizer state
    scheduler.pt        learning-rate schedule state
    rng.pt              random number generator states (noise, timesteps, dropout), of every process
    ema.safetensors     with --ema_decay, once the average has started: the EMA by parameter name
    train_state.json    step, epoch, the next batch within that epoch, a fingerprint of the data

A folder is written under a temporary name and renamed, so a crash never leaves half a state.
With several processes every process takes part in saving (a LoRA and optimizer state sharded by
FSDP are gathered whole, the random states of all processes collected) and the first one writes;
the folder is the same with and without FSDP.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from kandinsky5.training.ema import STATE_NAME as EMA_STATE
from kandinsky5.training.ema import WeightAverage
from modules.atomic_save import save_safetensors_atomic, sync_tree, temporary_folder
from modules.safetensors_read import SafetensorsFile
from modules.sharded_tensors import is_sharded, shaped_like, whole
from networks.adapter_network import AdapterNetwork

STATE_FILE = "train_state.json"
SCALER_FILE = "scaler.pt"


@dataclass
class Position:
    step: int  # optimizer steps done
    epoch: int  # the epoch (from 1) the next batch belongs to
    next_batch: int  # index of that batch within this process's share of the epoch
    data_fingerprint: str
    processes: int = 1  # how many processes shared the epoch's batches (states of before: 1)


def _several_processes() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def whole_optimizer_state(optimizer) -> dict:
    """The optimizer's state dict with sharded (FSDP) state tensors gathered whole."""
    state = optimizer.state_dict()
    state["state"] = {
        index: {key: whole(value) if is_sharded(value) else value for key, value in values.items()}
        for index, values in state["state"].items()
    }
    return state


def sharded_optimizer_state(optimizer, state: dict) -> dict:
    """A whole optimizer state cut to this process's shards where the parameters are sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    cut = {}
    for index, values in state["state"].items():
        param = params[index] if isinstance(index, int) and index < len(params) else None
        sharded = param is not None and is_sharded(param)
        cut[index] = {
            key: shaped_like(value, param)
            if sharded and isinstance(value, torch.Tensor) and value.shape == param.shape
            else value
            for key, value in values.items()
        }
    return {**state, "state": cut}


def rng_states() -> dict:
    """This process's random states, and with several processes those of each one (``processes``)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    states = {"torch": torch.get_rng_state(), "cuda": cuda}
    if _several_processes():
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, states)
        states["processes"] = every
    return states


def save_state(
    folder: Path,
    network: AdapterNetwork,
    metadata: dict[str, str],
    optimizer,
    scheduler,
    position: Position,
    write: bool = True,
    ema: WeightAverage | None = None,
) -> None:
    """Every process calls this; only where ``write`` is set is the folder written."""
    lora, optimizer_state, rng = network.kohya_state_dict(), whole_optimizer_state(optimizer), rng_states()
    ema_state = ema.state() if ema is not None else None
    scaler = gradient_scaler(optimizer)
    if not write:
        return
    folder = Path(folder)
    tmp = temporary_folder(folder)
    try:
        save_safetensors_atomic(lora, tmp / "lora.safetensors", metadata=metadata)
        _save_pt(optimizer_state, tmp / "optimizer.pt")
        _save_pt(scheduler.state_dict(), tmp / "scheduler.pt")
        _save_pt(rng, tmp / "rng.pt")
        if scaler is not None:
            _save_pt(scaler.state_dict(), tmp / SCALER_FILE)
        if ema is not None:
            ema.save_state(tmp, ema_state)
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


def gradient_scaler(optimizer):
    """fp16 on a GPU: the loss scale accelerate's optimizer wrapper keeps (None otherwise). A resumed
    run without it would start again from 65536 and skip steps until the scale came back down."""
    return getattr(optimizer, "scaler", None)


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
        return Position(
            **{name: values[name] for name in ("step", "epoch", "next_batch", "data_fingerprint")},
            processes=values.get("processes", 1),
        )
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


def state_folder(folder: Path, say: bool = True) -> Path:
    """The state folder to resume from: ``folder``, or the previous state kept aside when a run was killed
    while renaming a new one in; one that is not a state folder is a StateError."""
    folder = Path(folder)
    if not folder.exists() and aside(folder).is_dir():  # killed while a new state was being renamed in
        if say:
            print(f"note: {folder} is missing; resuming from the previous state kept at {aside(folder)}")
        folder = aside(folder)
    if not (folder / STATE_FILE).exists():
        raise StateError(f"--resume {folder}: not a training state folder (no {STATE_FILE})")
    return folder


def read_state_files(folder: Path) -> tuple[Position, dict, dict, dict, dict | None]:
    """(position, optimizer state, schedule state, RNG states, gradient-scaler state or None) of a state
    folder, every file checked, nothing restored; the LoRA file's header is checked too."""
    position = _read_position(folder)
    optimizer_state, scheduler_state, rng = (
        _load_pickle_free(folder, name) for name in ("optimizer.pt", "scheduler.pt", "rng.pt")
    )
    # saved by an fp16 run; an fp16 run resuming a state without it starts from a new scale
    scaler_state = _load_pickle_free(folder, SCALER_FILE) if (folder / SCALER_FILE).exists() else None
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
        raise StateError(f"--resume {folder}: rng.pt holds no random number generator state")
    try:
        with SafetensorsFile(folder / "lora.safetensors") as f:
            f.keys()
    except (OSError, ValueError) as error:
        raise StateError(f"--resume {folder}: lora.safetensors cannot be read ({error})") from None
    return position, optimizer_state, scheduler_state, rng, scaler_state


def load_state(
    folder: Path, network: AdapterNetwork, optimizer, scheduler, ema: WeightAverage | None = None
) -> tuple[Position, dict]:
    """Restore the LoRA, optimizer, schedule and EMA; returns the position and the RNG states to restore
    just before training continues. Every file is checked before anything is restored."""
    folder = state_folder(folder)
    position, optimizer_state, scheduler_state, rng, scaler_state = read_state_files(folder)
    network.load_weights(folder / "lora.safetensors")
    try:
        optimizer.load_state_dict(sharded_optimizer_state(optimizer, optimizer_state))
        scheduler.load_state_dict(scheduler_state)
        scaler = gradient_scaler(optimizer)
        if scaler is not None and scaler_state is not None:
            scaler.load_state_dict(scaler_state)
    except (KeyError, ValueError, TypeError) as error:
        raise StateError(
            f"--resume {folder}: the optimizer or schedule state does not fit this run ({error})"
        ) from None
    if ema is not None:
        ema.load_state(folder)
    elif (folder / EMA_STATE).exists():
        print(f"note: {folder} holds an EMA of the weights; without --ema_decay this run does not continue it")
    return position, rng


def restore_rng(states: dict) -> None:
    """This process's random states as saved (with as many processes as then; else the first one's)."""
    every = states.get("processes")
    if _several_processes() and isinstance(every, list) and len(every) == dist.get_world_size():
        states = every[dist.get_rank()]
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def remove_old(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
