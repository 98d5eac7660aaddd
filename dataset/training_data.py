"""Training batches from cache files: latents paired with their text, grouped by latent shape.

Each batch holds samples of one latent shape (one bucket and clip length). Captions of different
lengths are right-padded with a mask, so any batch size works. The batch order of an epoch comes
from ``seed + epoch`` alone, so a run and its resumption see the same batches.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache_files import (
    LATENT_SUFFIX,
    LATENT_TENSORS,
    TEXT_TENSORS,
    DamagedCache,
    item_key_of,
    read_header,
    read_tensors,
    serves,
    text_cache_name,
)
from .config import DatasetConfig


@dataclass(frozen=True)
class TrainingSample:
    latent_file: Path
    text_file: Path
    shape: tuple[int, ...]  # of the latent: (T, H/8, W/8, 16)


@dataclass
class DatasetSamples:
    dataset: DatasetConfig
    samples: list[TrainingSample]
    without_text: list[Path]
    damaged: list[DamagedCache]  # its items are not in samples


def find_samples(dataset: DatasetConfig) -> DatasetSamples:
    """The dataset's cached samples: the latent caches this config made (another config's files in the
    same folder are not read), each with its item's text cache. Every file's header is checked; an item
    with a damaged latent or text cache is left out and listed in ``damaged`` (each file once)."""
    samples, without_text, damaged = [], [], {}
    for latent in sorted(dataset.cache_directory.glob(f"*{LATENT_SUFFIX}")):
        text = dataset.cache_directory / text_cache_name(item_key_of(latent))
        try:
            header = read_header(latent, LATENT_TENSORS)
        except DamagedCache as error:
            damaged.setdefault(latent, error)
            header = None
        if header is not None and not serves(header.metadata, dataset.recipe):
            continue
        if not text.exists():
            without_text.append(latent)
            continue
        try:
            read_header(text, TEXT_TENSORS)
        except DamagedCache as error:
            damaged.setdefault(text, error)
            continue
        if header is not None:
            samples.append(TrainingSample(latent, text, header.shapes["latent"]))
    return DatasetSamples(dataset, samples, without_text, list(damaged.values()))


def epoch_batches(datasets: list[DatasetSamples], epoch: int, seed: int) -> list[list[TrainingSample]]:
    """Every sample num_repeats times, in batches of one shape and of the dataset's batch size, shuffled."""
    rng = random.Random(seed + epoch)
    batches = []
    for entry in datasets:
        by_shape: dict[tuple, list[TrainingSample]] = {}
        for sample in entry.samples * entry.dataset.num_repeats:
            by_shape.setdefault(sample.shape, []).append(sample)
        for shape in sorted(by_shape):
            group = by_shape[shape]
            rng.shuffle(group)
            size = entry.dataset.batch_size
            batches += [group[i : i + size] for i in range(0, len(group), size)]
    rng.shuffle(batches)
    return batches


def load_batch(samples: list[TrainingSample]) -> dict:
    """latents (B, T, h, w, 16), first_frame and last_frame (B, 1, h, w, 16) and control (B, 1, h, w, 16: an edit's
    source) when cached, text (B, L, D) padded,
    text_mask (B, L), pooled (B, D2), text_padded: whether any text is padded (known on the host,
    so that the training step need not ask the device), and files: the latent cache files' paths."""
    latents, firsts, lasts, controls, texts, pooled = [], [], [], [], [], []
    for sample in samples:
        latent = read_tensors(sample.latent_file, LATENT_TENSORS, optional=("first_frame", "last_frame", "control"))
        latents.append(latent["latent"])
        if "first_frame" in latent:
            firsts.append(latent["first_frame"])
        if "last_frame" in latent:
            lasts.append(latent["last_frame"])
        if "control" in latent:
            controls.append(latent["control"])
        text = read_tensors(sample.text_file, TEXT_TENSORS)
        texts.append(text["text"])
        pooled.append(text["pooled"])
    length = max(t.shape[0] for t in texts)
    text = torch.zeros(len(texts), length, texts[0].shape[1], dtype=texts[0].dtype)
    mask = torch.zeros(len(texts), length, dtype=torch.bool)
    for i, t in enumerate(texts):
        text[i, : t.shape[0]], mask[i, : t.shape[0]] = t, True
    batch = {"latents": torch.stack(latents), "text": text, "text_mask": mask, "pooled": torch.stack(pooled)}
    batch["text_padded"] = any(t.shape[0] < length for t in texts)
    batch["files"] = [str(sample.latent_file) for sample in samples]  # named when the loss goes bad
    if len(firsts) == len(samples):
        batch["first_frame"] = torch.stack(firsts)
    if len(lasts) == len(samples):
        batch["last_frame"] = torch.stack(lasts)
    if len(controls) == len(samples):
        batch["control"] = torch.stack(controls)
    return batch


def common_count(batches: list, processes: int) -> list:
    """The epoch's batches made a multiple of the process count, so that every process takes as many
    steps: fewer batches than processes are repeated from the start (padded), more have their
    remainder left out (the order changes every epoch, so no batch is always the one left out)."""
    if len(batches) < processes:
        return [batches[i % len(batches)] for i in range(processes)] if batches else []
    return batches[: len(batches) - len(batches) % processes]


def sharing_note(count: int, processes: int) -> str | None:
    """What common_count does to an epoch of ``count`` batches, in words; None when nothing."""
    if processes == 1 or count % processes == 0:
        return None
    if count < processes:
        return f"{processes} processes, {count} batches an epoch: {processes - count} repeated so that each has one"
    left = count % processes
    return f"{processes} processes, {count} batches an epoch: {left} left out each epoch so that each has as many"


class EpochBatches(torch.utils.data.Dataset):
    """Batches keyed by (epoch, index), for a DataLoader with ``batch_size=None``. Each process gets
    every world_size-th batch (all shares equally long); the key carries the epoch, so loader workers
    (persistent or not) always read the right epoch's order."""

    def __init__(self, datasets: list[DatasetSamples], seed: int, rank: int = 0, world_size: int = 1):
        self.datasets, self.seed, self.rank, self.world_size = datasets, seed, rank, world_size
        self._epoch, self._batches = None, []

    def batches(self, epoch: int) -> list[list[TrainingSample]]:
        if epoch != self._epoch:
            batches = epoch_batches(self.datasets, epoch, self.seed)
            self.epoch_size = len(batches)  # before common_count (the same in every epoch)
            batches = common_count(batches, self.world_size)
            self._epoch, self._batches = epoch, batches[self.rank :: self.world_size]
        return self._batches

    def sharing(self) -> str | None:
        """What making the epoch's batches a multiple of the process count does, in words (sharing_note)."""
        self.batches(self._epoch if self._epoch is not None else 0)
        return sharing_note(self.epoch_size, self.world_size)

    def __len__(self) -> int:
        """Batches per epoch (the same in every epoch: only their order changes)."""
        return len(self.batches(self._epoch if self._epoch is not None else 0))

    def __getitem__(self, key: tuple[int, int]) -> dict:
        """The batch; or, when one of its cache files cannot be read, ``{"damaged": DamagedCache}``
        (returned, not raised: a loader worker would wrap the error in its traceback)."""
        epoch, index = key
        try:
            return load_batch(self.batches(epoch)[index])
        except DamagedCache as damaged:
            return {"damaged": damaged}


class EpochOrder(torch.utils.data.Sampler):
    """Yields (epoch, index) keys of one epoch from ``start`` on (a resumed run skips what was done)."""

    def __init__(self, data: EpochBatches):
        self.data, self.epoch, self.start = data, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        return iter([(self.epoch, i) for i in range(self.start, len(self.data.batches(self.epoch)))])

    def __len__(self) -> int:
        return len(self.data.batches(self.epoch)) - self.start


def samples_fingerprint(datasets: list[DatasetSamples]) -> str:
    """Identifies the training set (cache files and repeats), to warn when a resumed run's data changed."""
    parts = [
        f"{s.latent_file.name}:{d.dataset.num_repeats}:{d.dataset.batch_size}" for d in datasets for s in d.samples
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
