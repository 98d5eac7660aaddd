"""An exponential moving average (EMA) of the trained network's weights, kept while training.

After optimizer step s (counted from 1), when s >= ``start_step`` and (s - start_step) is a multiple of
``update_every``, every trainable tensor's average moves: ema = decay * ema + (1 - decay) * weight,
in fp32. The first such step copies the weights. Under FSDP each process averages its own shards;
``applied`` puts the average in the network's place (for saving, samples or validation) and the
trained weights back after.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor

from modules.atomic_save import save_safetensors_atomic
from modules.sharded_tensors import is_sharded, shaped_like, whole

STATE_NAME = "ema.safetensors"


class EmaStateError(ValueError):
    pass


@dataclass(frozen=True)
class EmaSettings:
    decay: float
    start_step: int = 0
    update_every: int = 1
    on_cpu: bool = False


def ema_settings(args) -> EmaSettings:
    """The EMA options of a training run (--ema_decay and the options beside it)."""
    return EmaSettings(args.ema_decay, args.ema_start_step, args.ema_update_every, args.ema_device == "cpu")


class WeightAverage:
    def __init__(self, network: torch.nn.Module, settings: EmaSettings):
        self.network, self.settings = network, settings
        self.tensors: dict[str, torch.Tensor] | None = None  # None until the first update
        self.updates = 0

    def _trained(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name, each process's own shard of a sharded one."""
        return {n: local_of(p.detach()) for n, p in self.network.named_parameters() if p.requires_grad}

    def _store(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to("cpu" if self.settings.on_cpu else tensor.device, torch.float32, copy=True)

    @property
    def started(self) -> bool:
        return self.tensors is not None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        start, every = self.settings.start_step, self.settings.update_every
        if step < start or (step - start) % every:
            return
        trained = self._trained()
        if self.tensors is None:
            self.tensors = {name: self._store(p) for name, p in trained.items()}
        else:
            for name, p in trained.items():
                average = self.tensors[name]
                average.lerp_(p.to(average.device, torch.float32), 1.0 - self.settings.decay)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self):
        """The network holds the average inside the block (nothing changes before the first update)."""
        if self.tensors is None:
            yield
            return
        trained = self._trained()
        kept = {name: p.clone() for name, p in trained.items()}
        with torch.no_grad():
            for name, p in trained.items():
                p.copy_(self.tensors[name].to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in trained.items():
                    p.copy_(kept[name])

    def metadata(self) -> dict[str, str]:
        s = self.settings
        return {
            "ss_ema_decay": str(s.decay),
            "ss_ema_start_step": str(s.start_step),
            "ss_ema_update_every": str(s.update_every),
            "ss_ema_updates": str(self.updates),
        }

    def state(self) -> dict[str, torch.Tensor] | None:
        """The whole average by parameter name (gathered under FSDP: every process calls this), or None."""
        if self.tensors is None:
            return None
        params = dict(self.network.named_parameters())
        return {name: whole(as_shard_of(t, params[name])).cpu() for name, t in self.tensors.items()}

    def save_state(self, folder: Path, state: dict[str, torch.Tensor] | None) -> None:
        if state is not None:
            save_safetensors_atomic(state, folder / STATE_NAME, metadata=self.metadata())

    def load_state(self, folder: Path) -> None:
        """Restore the average saved in a state folder, exactly; a state without one starts afresh."""
        path = Path(folder) / STATE_NAME
        if not path.exists():
            print(f"note: {folder} holds no EMA; the average starts at step {self.settings.start_step} or later")
            return
        try:
            with safe_open(str(path), framework="pt") as f:
                saved, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except Exception as error:
            raise EmaStateError(f"--resume {folder}: {STATE_NAME} cannot be read ({error})") from None
        params = {n: p for n, p in self.network.named_parameters() if p.requires_grad}
        if set(saved) != set(params):
            raise EmaStateError(f"--resume {folder}: {STATE_NAME} does not hold this network's tensors")
        if meta.get("ss_ema_decay") not in (None, str(self.settings.decay)):
            print(f"note: the EMA of {folder} was kept with decay {meta['ss_ema_decay']}; it goes on with "
                  f"--ema_decay {self.settings.decay}")  # fmt: skip
        self.tensors = {}
        for name, tensor in saved.items():
            local = local_of(shaped_like(tensor.float(), params[name]))
            self.tensors[name] = self._store(local.to(local_of(params[name]).device))
        self.updates = int(meta.get("ss_ema_updates", "0"))


def local_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if is_sharded(tensor) else tensor


def as_shard_of(average: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A process's average of a sharded parameter as a shard of the same layout (to gather it)."""
    if not is_sharded(param):
        return average
    local = average.to(param.to_local().device)
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
