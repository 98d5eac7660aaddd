"""LoRA training of the Kandinsky 5 DiT, read top to bottom: data, model and LoRA, optimizer and
schedule, then the loop (forward, backward, step, log, save).

The DiT sees exactly what generation gives it: time t * 1000, the text once with its mask, and for
I2V the clean first frame in frame 0 with the mask channel set (frame 0 is left out of the loss,
as generation overwrites it), for I2I the clean source latent and a mask of ones beside the noisy
target (the loss is on the target).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import signal
import time
from collections import deque
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors import safe_open
from tqdm import tqdm

from dataset.cache_files import DamagedCache, foreign_caches
from dataset.training_data import (
    EpochBatches,
    EpochOrder,
    load_batch,
    samples_fingerprint,
)
from kandinsky5.encoders.prompt_expansion import stored_trigger
from kandinsky5.inference.denoiser import i2i_channels, i2v_channels, t2v_channels
from kandinsky5.model.attention import attention_backend, check_backend
from kandinsky5.model.checkpoint import check_architecture, load_dit, read_layout
from kandinsky5.model.memory_presets import apply_choice, latent_tokens, training_choice
from kandinsky5.model.nabla import nabla_params
from kandinsky5.model.sequence_parallel import join_sequence_groups
from kandinsky5.model.tasks import NABLA_SIZE_MULTIPLE, TaskPreset
from kandinsky5.training.cache_check import checked_samples, damaged_caches_message
from kandinsky5.training.ema import WeightAverage, ema_settings
from kandinsky5.training.first_checks import first_checks
from kandinsky5.training.first_last import FirstLastError, check_last_frames, last_frame_conditioning
from kandinsky5.training.flow_matching import flow_matching_loss, noisy_latents
from kandinsky5.training.fsdp_options import fsdp_settings
from kandinsky5.training.lost_process import lost_peer, lost_peer_message
from kandinsky5.training.musubi_runs import (
    HubUpload,
    base_weight_deltas,
    compile_options,
    network_size_of,
    show_timesteps,
    state_from_hub,
    training_kwargs_handlers,
)
from kandinsky5.training.sequence_groups import check_sequence_split, data_share
from kandinsky5.training.sharding import base_weight_bytes, shard_dit
from kandinsky5.training.timesteps import TimestepBuckets, loss_weights, sample_timesteps
from kandinsky5.training.trackers import SampleLog, chosen_trackers, start_trackers
from kandinsky5.training.training_samples import TrainingSampler
from kandinsky5.training.training_state import (
    Position,
    load_state,
    read_state_files,
    remove_old,
    restore_rng,
    save_state,
    state_folder,
)
from modules.atomic_save import remove_leftovers, save_safetensors_atomic
from modules.optimizers import create_optimizer, create_scheduler, warmup_steps
from modules.prefetch import host_to_device, prefetch_to
from modules.sharded_tensors import whole
from networks.adapter_network import AdapterNetwork

PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAVE_PRECISION = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingError(ValueError):
    pass


def untouched_random_state(device):
    """Samples and validation leave the random state of training as they found it: the LoRA does not
    depend on whether (or on which processes) they run."""
    if torch.device(device).type == "cuda":
        return torch.random.fork_rng(devices=[torch.device(device)], device_type="cuda")
    return torch.random.fork_rng(devices=[])


def refuse_unavailable(args: argparse.Namespace) -> None:
    if args.gradient_checkpointing_cpu_offload and not args.gradient_checkpointing:
        raise TrainingError("--gradient_checkpointing_cpu_offload needs --gradient_checkpointing")


def draw_timesteps(
    args: argparse.Namespace,
    batch: int,
    latent_hw: tuple[int, int],
    generator: torch.Generator | None = None,
    buckets: TimestepBuckets | None = None,
) -> torch.Tensor:
    """The timesteps of ``batch`` samples as the options say (see kandinsky5/training/timesteps.py)."""
    return sample_timesteps(
        batch,
        args.timestep_sampling,
        generator,
        latent_hw=latent_hw,
        weighting_scheme=args.weighting_scheme,
        sigmoid_scale=args.sigmoid_scale,
        discrete_flow_shift=args.discrete_flow_shift,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        mode_scale=args.mode_scale,
        min_timestep=args.min_timestep,
        max_timestep=args.max_timestep,
        preserve_distribution_shape=args.preserve_distribution_shape,
        buckets=buckets,
    )


def training_loss(
    dit,
    batch: dict,
    task: TaskPreset,
    args: argparse.Namespace,
    device,
    generator: torch.Generator | None = None,
    buckets: TimestepBuckets | None = None,
) -> torch.Tensor:
    """The flow-matching loss of a batch; noise and timesteps come from ``generator`` when given
    (validation: the same draws every time), else from the global random state."""
    x0 = batch["latents"].to(device, torch.float32)
    noise = torch.randn(x0.shape, generator=generator).to(device) if generator else torch.randn_like(x0)
    t_host = draw_timesteps(args, x0.shape[0], tuple(x0.shape[2:4]), generator, buckets)
    t = host_to_device(t_host, device)
    x_t = noisy_latents(x0, noise, t)
    shape, frame_weight, channels = tuple(x0.shape[:4]), None, None
    if task.kind == "i2v" and "first_frame" in batch and x0.shape[1] > 1:
        first_frame = batch["first_frame"].to(x_t)
        x_t = torch.cat([first_frame, x_t[:, 1:]], dim=1)
        channels = i2v_channels(shape, device, first_frame if task.image_in_condition else None)
        if args.i2v_mode == "first_last":
            last_frame = batch["last_frame"].to(device, torch.float32)
            channels = last_frame_conditioning(channels, last_frame, args.first_last_probability, generator)
        frame_weight = torch.ones(x0.shape[1], device=device)
        frame_weight[0] = 0.0
    elif task.kind == "i2i":  # the clean source beside the noisy target, with a mask of ones, as I2I generation
        channels = i2i_channels(batch["control"].to(device, torch.float32))
    elif dit.in_channels == 33:
        channels = t2v_channels(shape, device)
    model_input = x_t if channels is None else torch.cat([x_t, channels], dim=-1)
    prediction = dit(
        model_input,
        batch["text"].to(device),
        batch["pooled"].to(device),
        t * 1000.0,
        text_mask=batch["text_mask"].to(device) if batch.get("text_padded", True) else None,
        rope_scale=task.rope_scale,
        nabla=nabla_params(args, task),
    )
    weights = (
        None if args.weighting_scheme in ("none", "logit_normal", "mode") else loss_weights(args.weighting_scheme, t)
    )
    return flow_matching_loss(prediction, x0, noise, frame_weight, weights)


class Validation:
    """The loss on a held-out cached dataset at fixed noise and timesteps (seeded per batch), with dropout off."""

    def __init__(self, datasets: list, config: str, seed: int):
        if not any(entry.samples for entry in datasets):
            raise TrainingError(f"--validation_dataset_config {config}: no cached samples (run the caching commands)")
        self.batches, self.config, self.seed = EpochBatches(datasets, seed).batches(0), config, seed

    @torch.no_grad()
    def loss(self, dit, network, task: TaskPreset, args: argparse.Namespace, device, autocast) -> float:
        network.eval()
        total = 0.0
        for i, samples in enumerate(self.batches):
            generator = torch.Generator().manual_seed(self.seed + 1_000_003 * (i + 1))
            try:
                batch = load_batch(samples)
            except DamagedCache as damaged:
                message = damaged_caches_message([damaged], self.config, "--validation_dataset_config", True)
                raise TrainingError(message) from None
            with autocast():
                total += training_loss(dit, batch, task, args, device, generator).item()
        network.train()
        return total / len(self.batches)


def lora_metadata(
    args: argparse.Namespace, task: TaskPreset, epoch: int, step: int, started: float, datasets
) -> dict[str, str]:
    info = {
        "ss_base_model_version": "kandinsky5",
        "ss_network_module": args.network_module,
        "ss_network_dim": str(args.network_dim),
        "ss_network_alpha": str(args.network_alpha or args.network_dim),
        "ss_network_dropout": str(args.network_dropout),
        "ss_network_args": json.dumps(args.network_args or []),
        "ss_learning_rate": str(args.learning_rate),
        "ss_optimizer": args.optimizer_type,
        "ss_optimizer_args": json.dumps(args.optimizer_args or []),
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_lr_warmup_steps": str(args.lr_warmup_steps),
        "ss_max_grad_norm": str(args.max_grad_norm),
        "ss_mixed_precision": args.mixed_precision,
        "ss_seed": str(args.seed),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "ss_max_train_steps": str(args.max_train_steps),
        "ss_gradient_checkpointing": str(args.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(args.gradient_accumulation_steps),
        "ss_timestep_sampling": args.timestep_sampling,
        "ss_discrete_flow_shift": str(args.discrete_flow_shift),
        "ss_sigmoid_scale": str(args.sigmoid_scale),
        "ss_min_timestep": str(args.min_timestep),
        "ss_max_timestep": str(args.max_timestep),
        "ss_task": task.name,
        "ss_sd_model_name": Path(args.dit).name,
        "ss_output_name": args.output_name,
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(time.time()),
        "ss_num_train_items": str(sum(len(d.samples) for d in datasets)),
        "ss_scheduler_scale": str(args.scheduler_scale or task.scheduler_scale),
        "ss_datasets": json.dumps(
            [
                {
                    "kind": d.dataset.kind,
                    "resolution": list(d.dataset.resolution),
                    "batch_size": d.dataset.batch_size,
                    "num_repeats": d.dataset.num_repeats,
                    "samples": len(d.samples),
                }
                for d in datasets
            ]
        ),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "Kandinsky-5/lora",
        "modelspec.implementation": "https://github.com/kandinskylab/kandinsky-5",
        "modelspec.title": args.output_name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if args.min_timestep or args.max_timestep != 1000:
        info["modelspec.timestep_range"] = f"{args.min_timestep:g},{args.max_timestep:g}"
    if args.training_comment:
        info["ss_training_comment"] = args.training_comment
    if args.trigger_word:
        info["trigger"] = stored_trigger(args.trigger_word)
    for key, field in (
        ("title", "title"),
        ("author", "author"),
        ("description", "description"),
        ("license", "license"),
        ("tags", "tags"),
        ("reso", "resolution"),
        ("arch", "architecture"),
    ):
        if getattr(args, f"metadata_{key}", None):
            info[f"modelspec.{field}"] = getattr(args, f"metadata_{key}")
    return info


@contextlib.contextmanager
def _stop_when_unwritable(path: Path):
    """A failed save (the disk is full, say) stops training with a message; what was saved is intact."""
    try:
        yield
    except OSError as error:
        raise TrainingError(
            f"cannot write {path}: {error.strerror or error}; stopping (the files saved before are intact)"
        ) from None


class Checkpoints:
    """What output_dir receives: LoRA files per epoch, per step (with rotation) and at the end, each
    with a state folder when asked (--save_state), and a state when training is interrupted. Every
    process calls these methods (a LoRA sharded by FSDP is gathered for saving); the main one writes."""

    def __init__(
        self,
        args: argparse.Namespace,
        network: AdapterNetwork,
        optimizer,
        scheduler,
        metadata,
        main: bool,
        upload=None,
        ema: WeightAverage | None = None,
    ):
        self.args, self.network, self.optimizer, self.scheduler = args, network, optimizer, scheduler
        self.ema = ema
        self.metadata, self.directory, self.main = metadata, Path(args.output_dir), main
        self.upload = upload or (lambda path, is_state=False: None)
        self.written: set[Path] = set()  # rotation deletes only what this run wrote
        self.last_state: tuple[Position, Path] | None = None

    def _save(self, name: str, position: Position, with_state: bool) -> Path:
        path = self.directory / f"{name}.safetensors"
        weights = self.network.kohya_state_dict(SAVE_PRECISION[self.args.save_precision])
        if self.main:
            metadata = None if self.args.no_metadata else self.metadata(position)
            with _stop_when_unwritable(path):
                save_safetensors_atomic(weights, path, metadata=metadata)
            self.written.add(path)
            tqdm.write(f"saved {path}")
            self.upload(path)
        if self.ema is not None and self.ema.started:
            self._save_ema(name, position)
        if with_state:
            self.save_state(f"{name}-state", position)
        return path

    def _save_ema(self, name: str, position: Position) -> None:
        """``<name>-ema.safetensors``: the EMA of the weights, beside the file of the same save."""
        path = self.directory / f"{name}-ema.safetensors"
        with self.ema.applied():
            weights = self.network.kohya_state_dict(SAVE_PRECISION[self.args.save_precision])
        if self.main:
            metadata = None if self.args.no_metadata else {**self.metadata(position), **self.ema.metadata()}
            with _stop_when_unwritable(path):
                save_safetensors_atomic(weights, path, metadata=metadata)
            self.written.add(path)
            tqdm.write(f"saved {path}")
            self.upload(path)

    def state_of(self, position: Position) -> Path | None:
        """The state folder saved at exactly this position, if the last save was there (every process knows)."""
        return self.last_state[1] if self.last_state and self.last_state[0] == position else None

    def save_state(self, name: str, position: Position) -> Path:
        folder = self.directory / name
        self.last_state = (position, folder)
        metadata = self.metadata(position)
        with _stop_when_unwritable(folder):
            save_state(
                folder, self.network, metadata, self.optimizer, self.scheduler, position, write=self.main, ema=self.ema
            )
        if self.main:
            self.written.add(folder)
            tqdm.write(f"saved training state {folder}")
            self.upload(folder, is_state=True)
        return folder

    def _remove(self, name: str, part: str) -> None:
        """Remove the LoRA file (``part`` "file") or the state folder ("state") of an older save, if
        this run wrote it (musubi's *_state options rotate states apart from files)."""
        path = self.directory / (f"{name}.safetensors" if part == "file" else f"{name}-state")
        if not self.main or path not in self.written:
            return
        if part == "file":
            path.unlink(missing_ok=True)
            path.with_name(f"{name}-ema.safetensors").unlink(missing_ok=True)
        else:
            remove_old(path)

    def after_step(self, position: Position) -> None:
        every, step, args = self.args.save_every_n_steps, position.step, self.args
        if every and step % every == 0:
            name_of = lambda i: f"{args.output_name}-step{i:08d}"  # noqa: E731
            self._save(name_of(step), position, args.save_state)
            states = args.save_last_n_steps_state or args.save_last_n_steps
            for keep, part in ((args.save_last_n_steps, "file"), (states, "state")):
                if keep:  # musubi-tuner's meaning: the saves of the last N steps are kept
                    old = step - keep - 1
                    old -= old % every
                    if old > 0:
                        self._remove(name_of(old), part)

    def after_epoch(self, epoch: int, position: Position, last: bool) -> None:
        every, args = self.args.save_every_n_epochs, self.args
        if every and epoch % every == 0 and not last:
            name_of = lambda i: f"{args.output_name}-{i:06d}"  # noqa: E731
            self._save(name_of(epoch), position, args.save_state)
            states = args.save_last_n_epochs_state or args.save_last_n_epochs
            for keep, part in ((args.save_last_n_epochs, "file"), (states, "state")):
                if keep and epoch - every * keep > 0:  # the last N epoch saves are kept
                    self._remove(name_of(epoch - every * keep), part)

    def final(self, position: Position) -> Path:
        return self._save(self.args.output_name, position, self.args.save_state or self.args.save_state_on_train_end)


class TrainingInterrupted(Exception):
    pass


class StopRequest:
    """Turns SIGINT / SIGTERM into a request that the loop honours at the next optimizer step."""

    def __init__(self, main: bool = True):
        self.requested, self.main = False, main
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._request)
        return self

    def _request(self, signum, frame) -> None:
        # said once, by the first process: a terminal's Ctrl-C reaches every process and the launcher,
        # which then sends SIGTERM as well. On stdout: accelerate's launcher relays the process's stderr
        # and may lose what arrives while its own Ctrl-C interrupts it (tqdm clears the bar either way)
        if not self.requested and self.main:
            tqdm.write("stopping after this step; saving a state to resume from")
        self.requested = True

    def __exit__(self, exc_type, exc, traceback) -> None:
        for sig, handler in self._previous.items():
            # a process whose peer is gone is about to say so and exit: the launcher's SIGTERM to it must not
            # cut that message short
            signal.signal(sig, signal.SIG_IGN if lost_peer(exc) else handler)

    def requested_anywhere(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop: all stop at the same step (saving takes them all)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        anywhere = bool(accelerator.reduce(flag, reduction="sum").item())
        if anywhere and not self.requested and self.main:  # a signal to another process alone
            tqdm.write("another process was asked to stop: stopping after this step; saving a state to resume from")
        return anywhere


@contextlib.contextmanager
def lost_peer_stops(accelerator: Accelerator, args: argparse.Namespace):
    """With several processes: a peer that ended (its connection closed in an exchange) stops this one with a
    message naming the last complete state, not a traceback (kandinsky5/training/lost_process.py)."""
    try:
        yield
    except RuntimeError as error:
        if accelerator.num_processes == 1 or not lost_peer(error):
            raise
        message = lost_peer_message(
            error, accelerator.process_index, accelerator.num_processes, args.output_dir, args.output_name
        )
        raise TrainingError(message) from None


def continue_with_this_process_count(position: Position, processes: int, share: int, main: bool) -> Position:
    """A state saved by another number of processes: the batches its processes had done in the epoch,
    counted over all of them, give where each of this run's processes goes on in its share (a few
    batches may be seen twice, none skipped)."""
    if position.processes == processes:
        return position
    done = position.next_batch * position.processes
    start = done // processes
    epoch, start = (position.epoch + 1, 0) if start >= share else (position.epoch, start)
    if main:
        print(
            f"the state was saved by {position.processes} process(es), this run has {processes}: {done} batches of "
            f"epoch {position.epoch} were done, so each process goes on from batch {start} of its share of "
            f"epoch {epoch}; the step count goes on from {position.step}"
        )
    return Position(position.step, epoch, start, position.data_fingerprint, processes)


def leave_stopping_to_the_main_process(worker_id: int) -> None:
    """Loader workers ignore Ctrl-C and SIGTERM (a terminal and accelerate's launcher send them to every
    process): the training process finishes its step and saves a state, then its workers end with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def check_latent_kind(datasets, task: TaskPreset, forced_nabla: bool = False) -> None:
    """The caches fit the task: latents of its VAE, editing pairs for I2I and, for NABLA tasks (or NABLA
    forced on a dense one), frames NABLA can tile."""
    for entry in datasets:
        for sample in entry.samples[:1]:
            with safe_open(str(sample.latent_file), framework="pt") as f:
                vae, paired = (f.metadata() or {}).get("vae"), "control" in f.keys()
            if task.kind == "i2i" and not paired:
                raise TrainingError(
                    f"{sample.latent_file} holds no source image: task {task.name} trains on editing pairs; give the "
                    f"dataset a control_directory and cache with --task {task.name}"
                )
            if vae != task.vae:
                raise TrainingError(
                    f"{sample.latent_file} was cached with the {vae} VAE, but task {task.name} "
                    f"needs {task.vae} latents: cache with --task {task.name}"
                )
        if task.nabla is None and not forced_nabla:
            continue
        for sample in entry.samples:
            _, height, width, _ = sample.shape
            if (height * 8) % NABLA_SIZE_MULTIPLE or (width * 8) % NABLA_SIZE_MULTIPLE:
                who, fix = (
                    (f"task {task.name} uses NABLA attention", f"with --task {task.name}")
                    if task.nabla is not None
                    else (
                        "--force_nabla_attention asks for NABLA attention",
                        "with a NABLA task of this model (the 10 s or HD presets)",
                    )
                )
                raise TrainingError(
                    f"{sample.latent_file} holds {width * 8}x{height * 8} px frames, but {who}, which needs sides in "
                    f"multiples of {NABLA_SIZE_MULTIPLE} px: re-cache the latents {fix} (its buckets are multiples of "
                    f"{NABLA_SIZE_MULTIPLE}), or train without NABLA"
                )


def preflight(args: argparse.Namespace) -> tuple[list, list | None]:
    """Every check that needs neither a model nor the accelerator, in the order a run meets them; returns
    the datasets with their cached samples, and the validation datasets' (None without a validation
    config). train() starts with it and the web UI runs it before it launches a run, so both give the
    same message."""
    refuse_unavailable(args)
    files = first_checks(args)
    check_architecture(read_layout(files), args.task, str(args.dit))  # from the header alone
    if args.resume and not args.resume_from_huggingface:  # a state training would refuse, named before it loads
        read_state_files(state_folder(args.resume, say=False))
    datasets = checked_samples(args.dataset_config, "--dataset_config", args.skip_damaged_caches)
    validation_sets = None
    if args.validation_dataset_config:
        option = "--validation_dataset_config"
        validation_sets = checked_samples(args.validation_dataset_config, option, args.skip_damaged_caches)
    if not any(entry.samples for entry in datasets):
        folders = ", ".join(str(e.dataset.cache_directory) for e in datasets)
        foreign = [found for e in datasets for found in foreign_caches(e.dataset.cache_directory)]
        if foreign:
            path, tool = foreign[0]
            raise TrainingError(
                f"no training samples of this toolkit in {folders}, but {len(foreign)} cache files of another "
                f"tool, such as {path} ({tool}'s cache, another layout, not read here): run this toolkit's caching "
                "commands (they write *_k5tk.safetensors beside those and leave them alone)"
            )
        raise TrainingError(f"no training samples (latent + text caches) in {folders}: run the caching commands first")
    check_latent_kind(datasets, args.task, getattr(args, "force_nabla_attention", False))
    if args.sequence_parallel > 1:
        why = check_sequence_split(args.sequence_parallel, args.task.dit_params, datasets + (validation_sets or []))
        if why:
            raise TrainingError(why)
    if args.i2v_mode == "first_last":
        try:
            check_last_frames(datasets, args.task, args.dataset_config)
            if validation_sets:
                check_last_frames(validation_sets, args.task, args.validation_dataset_config)
        except FirstLastError as error:
            raise TrainingError(str(error)) from None
    return datasets, validation_sets


def train(args: argparse.Namespace) -> Path:
    task = args.task
    datasets, validation_sets = preflight(args)
    if args.vram:
        tokens = max(latent_tokens(sample.shape) for entry in datasets for sample in entry.samples)
        tokens //= args.sequence_parallel  # each process's share of a split step
        line = apply_choice(args, training_choice(task, tokens, args.vram), args.given_options, args.vram)
        if int(os.environ.get("RANK", "0")) == 0:
            print(line)
    trackers = chosen_trackers(args)
    log_with = trackers or None
    # Several processes without CUDA (accelerate launch --multi_gpu --num_processes N on a CPU machine): gloo.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    fsdp = fsdp_settings()  # accelerate launch with an FSDP config: the DiT and LoRA are sharded
    if fsdp:
        if fsdp.activation_checkpointing and not args.gradient_checkpointing:
            print("FSDP config: fsdp_activation_checkpointing: true, so --gradient_checkpointing is on")
            args.gradient_checkpointing = True
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_dir=args.logging_dir,
        cpu=cpu_processes,
        kwargs_handlers=training_kwargs_handlers(args),
    )
    set_seed(args.seed)  # the same draws in every process: a sequence group's processes draw the same noise
    device, main = accelerator.device, accelerator.is_main_process
    split = join_sequence_groups(args.sequence_parallel) if args.sequence_parallel > 1 else None
    share, shares = data_share(accelerator.process_index, accelerator.num_processes, args.sequence_parallel)
    check_backend(attention_backend(args), device)  # before anything loads
    if main:
        remove_leftovers(args.output_dir)  # hidden files of saves that were killed

    # data
    for entry in datasets:
        if entry.without_text and main:
            print(
                f"warning: {len(entry.without_text)} latent caches of {entry.dataset.name} have no text cache; "
                "run kandinsky5_cache_text_encoder_outputs.py"
            )
    if args.show_timesteps:  # musubi-tuner's meaning: show what training would draw, then stop
        _, height, width, _ = next(s for e in datasets for s in e.samples).shape
        drawn = show_timesteps(
            args,
            lambda n, hw: draw_timesteps(args, n, hw),
            lambda t: loss_weights(args.weighting_scheme, t),
            (height, width),
        )
        if drawn is not None and trackers and main:  # the picture goes to the trackers too
            import numpy as np
            from PIL import Image

            start_trackers(accelerator, trackers, args, {"task": task.name})
            picture = torch.from_numpy(np.asarray(Image.open(drawn).convert("RGB"))).permute(2, 0, 1)
            SampleLog(accelerator, trackers)("timesteps", drawn, picture, 0, video=False)
            accelerator.end_training()
        return drawn or Path(args.output_dir)
    fingerprint = samples_fingerprint(datasets)
    data = EpochBatches(datasets, args.seed, share, shares)
    note = data.sharing()
    if note and main:
        print(note)
    order = EpochOrder(data)
    workers = args.max_data_loader_n_workers
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        sampler=order,
        num_workers=workers,
        persistent_workers=args.persistent_data_loader_workers and workers > 0,
        generator=torch.Generator().manual_seed(args.seed),
        pin_memory=torch.device(device).type == "cuda",
        worker_init_fn=leave_stopping_to_the_main_process,
    )

    # model and LoRA
    # swapped blocks stay in CPU memory; FSDP moves each process's shards to its device
    load_device = "cpu" if args.blocks_to_swap or fsdp else device
    dit = load_dit(
        args.dit,
        task,
        device=load_device,
        dtype=PRECISION[accelerator.mixed_precision],
        fp8=args.fp8_base,
        deltas=base_weight_deltas(args),  # --base_weights, merged before any fp8 quantization
    )
    if args.blocks_to_swap:
        print(f"block swap: {dit.enable_block_swap(args.blocks_to_swap, device)} blocks in CPU memory")
    print(f"attention: {dit.set_attention_backend(attention_backend(args))}")
    dit.gradient_checkpointing = args.gradient_checkpointing
    dit.activation_offload = args.gradient_checkpointing_cpu_offload
    if args.dim_from_weights:
        rank, alpha = network_size_of(args.network_weights)
        args.network_dim, args.network_alpha = rank, args.network_alpha or alpha
        print(f"--dim_from_weights: rank {rank}, alpha {args.network_alpha:g} from {args.network_weights}")
    create_network = importlib.import_module(args.network_module).create_network
    network = create_network(dit, args.network_dim, args.network_alpha, args.network_dropout, args.network_args)
    if args.network_weights:
        network.load_weights(args.network_weights)
    if args.full_bf16 or args.full_fp16:  # musubi-tuner's full_*: the LoRA itself in 16 bits
        network.to(torch.bfloat16 if args.full_bf16 else torch.float16)
    network.apply_to(dit)
    if fsdp:
        shard_dit(dit, network, torch.device(device), fsdp)
        held, total = base_weight_bytes(dit)
        print(
            f"FSDP: process {accelerator.process_index} holds {held / 2**20:.2f} MiB of the {total / 2**20:.2f} MiB "
            f"of base weights ({held / total:.1%}) and its share of the LoRA"
        )
    if split is not None:
        dit.enable_sequence_parallel(split)
        print(
            f"sequence parallel: process {accelerator.process_index} runs 1/{split.size} of each step's visual tokens "
            f"in group {share + 1} of {shares}"
        )
    network.to(device).train()
    ema = WeightAverage(network, ema_settings(args)) if args.ema_decay else None
    compiling = compile_options(args)
    if compiling is not None:
        dit.compile_blocks(**compiling)

    # optimizer and schedule (counted in optimizer steps)
    accumulation = args.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(len(data) / accumulation))
    if args.max_train_epochs:
        args.max_train_steps = args.max_train_epochs * steps_per_epoch
    epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    warmup = warmup_steps(args.lr_warmup_steps, args.max_train_steps)
    if warmup >= args.max_train_steps and main:
        print(
            f"note: --lr_warmup_steps {args.lr_warmup_steps:g} is {warmup} steps, as long as or longer than the run "
            f"({args.max_train_steps} steps): the learning rate never reaches --learning_rate {args.learning_rate:g}"
        )
    optimizer = create_optimizer(
        args.optimizer_type,
        network.parameter_groups(args.learning_rate),
        args.learning_rate,
        args.optimizer_args,
        device,
    )
    # fp16 on a GPU: accelerate's gradient scaler scales the loss and unscales before clipping and stepping
    optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
    scheduler = create_scheduler(
        args.lr_scheduler,
        optimizer,
        warmup,
        args.max_train_steps,
        args.lr_scheduler_num_cycles,
        args.lr_scheduler_power,
        min_lr_ratio=args.lr_scheduler_min_lr_ratio,
        timescale=args.lr_scheduler_timescale,
        decay_steps=warmup_steps(args.lr_decay_steps, args.max_train_steps),
        class_path=args.lr_scheduler_type,
        class_args=args.lr_scheduler_args,
    )
    position, rng_states = Position(0, 1, 0, fingerprint, shares), None
    if args.resume and args.resume_from_huggingface:
        args.resume = state_from_hub(args)
    if args.resume:
        position, rng_states = load_state(args.resume, network, optimizer, scheduler, ema)
        if position.data_fingerprint != fingerprint and main:
            print(f"warning: the training data changed since {args.resume} was saved")
        if main:
            print(f"resuming from {args.resume}: step {position.step}, epoch {position.epoch}")
        position = continue_with_this_process_count(position, shares, len(data), main)
    started = time.time()
    upload = HubUpload(args)
    checkpoints = Checkpoints(
        args,
        network,
        optimizer,
        scheduler,
        lambda p: lora_metadata(args, task, p.epoch if p.next_batch else p.epoch - 1, p.step, started, datasets),
        main,
        upload,
        ema,
    )
    start_trackers(accelerator, trackers, args, {"task": task.name, "network_dim": args.network_dim})
    buckets = TimestepBuckets(args.num_timestep_buckets, args.seed) if args.num_timestep_buckets else None
    parameters = [p for p in network.parameters() if p.requires_grad]
    # a sharded or split DiT runs only with every process taking part: then all sample and validate, the main
    # one writes
    everyone = fsdp is not None or split is not None
    with untouched_random_state(device):  # loading the encoders and VAE draws random initial weights
        sampling = args.sample_prompts and (main or everyone)
        sampler = TrainingSampler(args, task, device, write=main) if sampling else None
        validation = Validation(validation_sets, args.validation_dataset_config, args.seed) if validation_sets else None

    def validate() -> None:
        due = args.validate_every_n_steps and step % args.validate_every_n_steps == 0
        if validation is not None and (main or everyone) and due:
            values = {}
            with untouched_random_state(device):
                values["loss/validation"] = validation.loss(dit, network, task, args, device, accelerator.autocast)
            if ema is not None and ema.started:
                with untouched_random_state(device), ema.applied():
                    values["loss/validation_ema"] = validation.loss(
                        dit, network, task, args, device, accelerator.autocast
                    )
            if main:
                ema_part = f" (EMA weights {values['loss/validation_ema']:.5f})" if len(values) > 1 else ""
                tqdm.write(f"step {step}: validation loss {values['loss/validation']:.5f}{ema_part}")
            if log_with:
                accelerator.log(values, step=step)

    tracker = SampleLog(accelerator, trackers) if trackers and sampler and main else None

    def sampling_weights():
        """The EMA weights in the network while samples are made, with --sample_with_ema."""
        return ema.applied() if ema is not None and args.sample_with_ema else contextlib.nullcontext()

    def sample(epoch_done: int | None = None) -> None:
        every_step, every_epoch = args.sample_every_n_steps, args.sample_every_n_epochs
        due = (epoch_done is None and every_step and step % every_step == 0) or (
            epoch_done is not None and every_epoch and epoch_done % every_epoch == 0
        )
        if sampler is not None and due:
            with untouched_random_state(device), sampling_weights():
                sampler.sample(dit, network, step, tracker)

    if sampler is not None and args.sample_at_first and not args.resume:
        with untouched_random_state(device):
            sampler.sample(dit, network, 0, tracker)
    if rng_states is not None:
        restore_rng(rng_states)

    # the loop
    step, recent = position.step, deque(maxlen=20)
    bar = tqdm(total=args.max_train_steps, initial=step, desc="training", unit="step", disable=not main)
    # (the peer check outermost: StopRequest's exit sees the lost peer and keeps the launcher's SIGTERM away)
    with lost_peer_stops(accelerator, args), StopRequest(main) as stop, contextlib.closing(bar):
        for epoch in range(position.epoch, epochs + 1):
            order.set_epoch(epoch - 1, position.next_batch if epoch == position.epoch else 0)
            total = len(data.batches(epoch - 1))
            step_loss, micro_steps, step_files = None, 0, []
            for i, batch in enumerate(prefetch_to(loader, device), start=order.start):
                if "damaged" in batch:
                    message = damaged_caches_message([batch["damaged"]], args.dataset_config, "--dataset_config", True)
                    raise TrainingError(message)
                with accelerator.autocast():
                    loss = training_loss(dit, batch, task, args, device, buckets=buckets)
                accelerator.backward(loss / accumulation)
                # summed on the device: the step reads it once, after all its work is queued
                step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
                step_files += batch["files"]
                micro_steps += 1
                if (i + 1) % accumulation and i + 1 < total:
                    continue
                if accelerator.num_processes > 1 and not fsdp:  # FSDP averages them in the backward
                    for p in parameters:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
                if args.max_grad_norm:
                    accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
                optimizer.step()
                if not optimizer.step_was_skipped:  # the scaler skips steps with inf/NaN gradients
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.after_step(step + 1)
                if args.scale_weight_norms:
                    scaled, mean_norm, max_norm = network.scale_weight_norms(args.scale_weight_norms)
                    if log_with:
                        accelerator.log(
                            {"keys_scaled": scaled, "average_key_norm": mean_norm, "max_key_norm": max_norm},
                            step=step + 1,
                        )
                value = step_loss.item() / micro_steps  # the one host-device sync of the step
                if not math.isfinite(value):
                    raise TrainingError(
                        f"the loss is {value} at step {step + 1}, on the cache files {', '.join(step_files)}; "
                        "stopping (the files saved so far are kept). Try a lower --learning_rate or "
                        "--max_grad_norm 1.0, or check those files"
                    )
                step_loss, micro_steps, step_files = None, 0, []
                recent.append(value)
                step += 1
                done_epoch = i + 1 >= total
                next_batch = 0 if done_epoch else i + 1
                position = Position(step, epoch + done_epoch, next_batch, fingerprint, shares)
                average = sum(recent) / len(recent)
                bar.update(1)
                bar.set_postfix(loss=f"{average:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if log_with:
                    accelerator.log(
                        {"loss/current": recent[-1], "loss/average": average, "lr": scheduler.get_last_lr()[0]},
                        step=step,
                    )
                checkpoints.after_step(position)
                sample()
                validate()
                if stop.requested_anywhere(accelerator):
                    # (a state this very step already saved is not written twice)
                    folder = checkpoints.state_of(position) or checkpoints.save_state(
                        f"{args.output_name}-step{step:08d}-state", position
                    )
                    raise TrainingInterrupted(f"interrupted at step {step}; continue with --resume {folder}")
                if step >= args.max_train_steps:
                    break
            checkpoints.after_epoch(epoch, position, last=step >= args.max_train_steps or epoch == epochs)
            sample(epoch_done=epoch)
            if step >= args.max_train_steps:
                break
        bar.close()
        # still inside StopRequest: Ctrl-C now waits for the finished run to be saved
        final = checkpoints.final(position)
    if accelerator.num_processes > 1:  # every process holds the same LoRA (gathered whole under FSDP); this shows it
        checksum = sum(float(whole(p.detach()).double().sum()) for p in network.parameters())
        print(f"process {accelerator.process_index}: LoRA checksum {checksum:.12e}")
    if log_with:
        accelerator.end_training()
    upload.wait()
    if accelerator.num_processes > 1:  # every process leaves the group together: no connection torn mid-exit
        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
    return final
