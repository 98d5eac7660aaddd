"""Encode the images and video clips of dataset configs to latent cache files."""

from __future__ import annotations

import argparse
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dataset.buckets import choose_bucket
from dataset.cache_files import (
    LATENT_SUFFIX,
    add_recipe,
    file_identity,
    is_current,
    item_key_of,
    latent_cache_name,
    recipes_with,
    source_fingerprint,
    write_cache,
)
from dataset.caching import CacheReport, prefetch, remove_stale
from dataset.config import DatasetConfig, load_dataset_config
from dataset.frames import clips, frames_needed, read_frames
from dataset.process_share import ONE_PROCESS, Processes
from dataset.sources import MediaItem, dataset_items
from kandinsky5.encoders.vae import VAE, load_vae
from kandinsky5.inference.media import MediaError, load_image, resize_and_crop
from kandinsky5.model.tasks import TaskPreset
from modules.atomic_save import remove_leftovers


@dataclass
class Unit:
    """One latent to encode: a clip (or an image) of resized uint8 frames."""

    path: Path
    fingerprint: dict
    frames: np.ndarray  # (F, H, W, 3) uint8, F = the clip's frames
    is_clip: bool
    source: Path  # the image or video it comes from
    control: np.ndarray | None = None  # image editing: the source image, (1, H, W, 3) uint8


def _pixels(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (3, F, H, W) in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def load_units(item: MediaItem, dataset: DatasetConfig, task: TaskPreset, base: dict) -> list[Unit]:
    """Decode, bucket, resize and cut one item into the latents it yields (raises on bad media)."""
    if item.error:
        raise ValueError(item.error)
    if not item.path.exists():
        raise ValueError("file not found")
    if dataset.kind == "image":
        images, clip_list = [load_image(item.path)], [None]
    else:
        images = read_frames(item.path, dataset.source_fps, frames_needed(dataset))
        clip_list = clips(len(images), dataset)
        if not clip_list:
            raise ValueError(
                f"has {len(images)} frames (at 24 fps), fewer than the shortest of target_frames "
                f"{dataset.target_frames}"
            )
    size = choose_bucket(
        *images[0].size, dataset.resolution, dataset.enable_bucket, dataset.bucket_no_upscale, task.size_multiple
    )
    frames = np.stack([np.asarray(resize_and_crop(image, *size), dtype=np.uint8) for image in images])
    source = source_fingerprint(item.path)
    control = None
    if task.kind == "i2i":
        # resized and cropped to the target's bucket, as generation prepares --image: (1, H, W, 3) uint8
        source_image = edit_source(item, images[0], dataset.control_directory)
        control = np.asarray(resize_and_crop(source_image, *size), dtype=np.uint8)[None]
        source["control"] = source_fingerprint(item.control)
    units = []
    for clip in clip_list:
        fingerprint = {
            **base,
            **source,
            "bucket": list(size),
            "clip": list(clip) if clip else None,
            "source_fps": dataset.source_fps,
            **({"last_frame": True} if clip else {}),  # clips hold their last frame alone too (first+last I2V)
        }
        path = dataset.cache_directory / latent_cache_name(item.key, size, clip)
        chosen = frames if clip is None else frames[clip[0] : clip[0] + clip[1]]
        units.append(Unit(path, fingerprint, chosen, clip is not None, item.path, control))
    return units


def edit_source(item: MediaItem, target: Image.Image, folder: Path | None) -> Image.Image:
    """The source image of an editing pair, checked against its target: a missing, unreadable or
    differently sized source is an error of this item naming both files."""
    if item.control is None:
        where = (
            f"no {item.path.stem}.<image extension> in {folder}"
            if folder
            else "give the dataset a control_directory (or its JSONL lines a control_path)"
        )
        raise ValueError(f"image editing needs the source image of this target: {where}")
    try:
        source = load_image(item.control)
    except MediaError as error:
        raise ValueError(f"its source {item.control}: {error}") from None
    if source.size != target.size:
        raise ValueError(
            f"its source {item.control} is {source.width}x{source.height}, the target {target.width}x"
            f"{target.height}: the two images of a pair must have one size"
        )
    return source


def encode_units(vae: VAE, units: list[Unit], seed: int, recipe: str) -> list[tuple[Unit, str]]:
    """Encode units of one shape together and write their cache files; returns the units that failed,
    with the reason (a latent that is not finite, a write that failed: the disk is full), the others
    written."""
    generator = torch.Generator().manual_seed(seed + zlib.crc32(units[0].path.name.encode()))
    latents = vae.encode(torch.stack([_pixels(u.frames) for u in units]), generator=generator).cpu()
    first = last = control = None
    if units[0].is_clip:  # the first and the last frame alone, as I2V generation encodes --image and --image_last
        first = vae.encode(torch.stack([_pixels(u.frames[:1]) for u in units]), generator=generator).cpu()
        last = vae.encode(torch.stack([_pixels(u.frames[-1:]) for u in units]), generator=generator).cpu()
    if units[0].control is not None:  # an edit's source, encoded as I2I generation encodes --image (seeded alone)
        control = torch.cat(
            [vae.encode(_pixels(u.control)[None], generator=torch.Generator().manual_seed(seed)).cpu() for u in units]
        )
    failures = []
    for i, unit in enumerate(units):
        tensors = {"latent": latents[i]}
        if first is not None:
            tensors["first_frame"], tensors["last_frame"] = first[i], last[i]
        if control is not None:
            tensors["control"] = control[i]
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            failures.append((unit, "the VAE gave NaN or infinite latents (not written)"))
            continue
        try:
            extra = {"vae": vae.kind.name, "recipes": recipes_with(unit.path, recipe)}
            write_cache(unit.path, tensors, "latent", unit.fingerprint, extra)
        except OSError as error:
            failures.append((unit, f"cannot write {unit.path.name}: {error.strerror or error}"))
    return failures


def cache_dataset(
    dataset: DatasetConfig,
    task: TaskPreset,
    vae: VAE,
    args: argparse.Namespace,
    base: dict,
    report: CacheReport,
    processes: Processes,
) -> None:
    items = processes.share(dataset_items(dataset))
    dataset.cache_directory.mkdir(parents=True, exist_ok=True)
    if processes.main:
        remove_leftovers(dataset.cache_directory)  # hidden files of writes that were killed
    processes.barrier()  # before any process starts writing there
    produced: set[Path] = set()
    failed: set[str] = set()
    pending: dict[tuple, list[Unit]] = {}
    batch_size = args.batch_size or dataset.batch_size

    def flush(shape: tuple) -> None:
        for unit, reason in encode_units(vae, pending.pop(shape), args.seed, dataset.recipe):
            report.fail(unit.source, reason)
            report.written -= 1
            failed.add(item_key_of(unit.path))  # its older cache, if any, is kept

    loaded = prefetch(lambda item: load_units(item, dataset, task, base), items, args.num_workers)
    bar = tqdm(loaded, total=len(items), desc=f"latents: {dataset.name}", unit="item", disable=not processes.main)
    for item, result in bar:
        if isinstance(result, Exception):
            report.fail(item.path, str(result))
            failed.add(item.key)
            continue
        for unit in result:
            produced.add(unit.path)
            if args.skip_existing and is_current(unit.path, unit.fingerprint):
                add_recipe(unit.path, dataset.recipe)  # maybe another config's file: it serves this one too
                report.skipped += 1
                continue
            shape = unit.frames.shape
            pending.setdefault(shape, []).append(unit)
            report.written += 1
            if len(pending[shape]) >= batch_size:
                flush(shape)
    for shape in list(pending):
        flush(shape)
    produced, failed = processes.union(produced), processes.union(failed)
    if processes.main:
        label = f"latents of {dataset.name}"
        remove_stale(
            dataset.cache_directory,
            f"*{LATENT_SUFFIX}",
            produced,
            failed,
            args.keep_cache,
            report,
            label,
            dataset.recipe,
        )


def cache_latents(args: argparse.Namespace, task: TaskPreset, processes: Processes = ONE_PROCESS) -> CacheReport:
    datasets = load_dataset_config(args.dataset_config)
    vae = load_vae(args.vae, task.vae, device=args.device, dtype=args.vae_dtype, task_name=task.name)
    if args.vae_tiling:
        vae.enable_tiling(args.vae_tile_size, args.vae_tile_frames)
    base = {
        "vae": task.vae,
        "vae_identity": file_identity(args.vae),
        "vae_dtype": str(args.vae_dtype),
        "tiling": [args.vae_tiling, args.vae_tile_size, args.vae_tile_frames],
        "seed": args.seed,
    }
    report = CacheReport()
    for dataset in datasets:
        cache_dataset(dataset, task, vae, args, base, report, processes)
    return report
