"""Encode the captions of dataset configs to text-encoder cache files."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from dataset.buckets import choose_bucket
from dataset.cache_files import (
    TEXT_SUFFIX,
    add_recipe,
    caption_hash,
    file_identity,
    is_current,
    recipes_with,
    source_fingerprint,
    text_cache_name,
    write_cache,
)
from dataset.caching import CacheReport, remove_stale
from dataset.config import DatasetConfig, load_dataset_config
from dataset.process_share import ONE_PROCESS, Processes
from dataset.sources import MediaItem, dataset_items
from kandinsky5.caching.cache_latents import edit_source
from kandinsky5.encoders.prompt_templates import TEMPLATES
from kandinsky5.encoders.text_encoders import PromptEncoder, load_prompt_encoder
from kandinsky5.inference.media import MediaError, load_image, resize_and_crop
from kandinsky5.model.tasks import TaskPreset
from modules.atomic_save import remove_leftovers


def template_name(dataset: DatasetConfig, task: TaskPreset) -> str:
    """Videos are encoded as generation encodes video prompts, images as it encodes 1-frame prompts,
    and the captions of editing pairs as it encodes an edit: with the source image."""
    if task.kind == "i2i":
        return "image_edit"
    return "video" if dataset.kind == "video" else "image"


def edit_prompt_image(item: MediaItem, dataset: DatasetConfig, task: TaskPreset) -> tuple[Image.Image, list[int]]:
    """The source image Qwen sees with an edit's caption, as I2I generation shows it --image: at half
    the target's bucket size; and that bucket. The pair is checked as latent caching checks it."""
    target = load_image(item.path)
    size = choose_bucket(
        *target.size, dataset.resolution, dataset.enable_bucket, dataset.bucket_no_upscale, task.size_multiple
    )
    source = edit_source(item, target, dataset.control_directory)
    return resize_and_crop(source, size[0] // 2, size[1] // 2), list(size)


def cache_dataset(
    dataset: DatasetConfig,
    encoder: PromptEncoder,
    task: TaskPreset,
    args: argparse.Namespace,
    base: dict,
    report: CacheReport,
    processes: Processes,
) -> None:
    template = TEMPLATES[template_name(dataset, task)]
    settings = {
        **base,
        "template": template.name,
        "max_length": task.qwen_max_length,
        "crop": encoder.qwen.crop_length(template),
    }
    dataset.cache_directory.mkdir(parents=True, exist_ok=True)
    if processes.main:
        remove_leftovers(dataset.cache_directory)  # hidden files of writes that were killed
    processes.barrier()  # before any process starts writing there
    produced: set[Path] = set()
    failed: set[str] = set()
    todo: list[tuple[MediaItem, Path, dict, Image.Image | None]] = []
    for item in processes.share(dataset_items(dataset)):
        image = None
        try:
            if item.error or not item.path.exists():
                raise ValueError(item.error or "file not found")
            fingerprint = {**settings, "caption": caption_hash(item.caption)}
            if task.kind == "i2i":  # the source image is part of the text features
                image, fingerprint["bucket"] = edit_prompt_image(item, dataset, task)
                fingerprint["control"] = source_fingerprint(item.control)
        except (ValueError, MediaError) as error:
            report.fail(item.path, str(error))
            failed.add(item.key)
            continue
        path = dataset.cache_directory / text_cache_name(item.key)
        produced.add(path)
        if args.skip_existing and is_current(path, fingerprint):
            add_recipe(path, dataset.recipe)  # maybe another config's file: it serves this one too
            report.skipped += 1
        else:
            todo.append((item, path, fingerprint, image))
    # captions with a source image are encoded one at a time (their image tokens differ in number)
    batch_size = 1 if task.kind == "i2i" else args.batch_size or dataset.batch_size
    with tqdm(total=len(todo), desc=f"captions: {dataset.name}", unit="caption", disable=not processes.main) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = [image for *_, image in batch] if task.kind == "i2i" else None
            encoded = encoder.encode([item.caption for item, *_ in batch], template, task.qwen_max_length, images)
            for i, (item, path, fingerprint, _) in enumerate(batch):
                length = int(encoded.mask[i].sum())
                if length >= task.qwen_max_length:
                    tqdm.write(
                        f"warning: the caption of {item.path} reaches the text encoder's limit of "
                        f"{task.qwen_max_length} tokens: {length} kept, the rest of it cut"
                    )
                tensors = {"text": encoded.embeddings[i, :length].cpu(), "pooled": encoded.pooled[i].cpu()}
                try:
                    extra = {"caption": item.caption, "template": template.name}
                    extra["recipes"] = recipes_with(path, dataset.recipe)
                    write_cache(path, tensors, "text", fingerprint, extra)
                except OSError as error:  # the disk is full, say: this item fails, the others go on
                    report.fail(item.path, f"cannot write {path.name}: {error.strerror or error}")
                    failed.add(item.key)
                    continue
                report.written += 1
            bar.update(len(batch))
    produced, failed = processes.union(produced), processes.union(failed)
    if processes.main:
        label = f"text of {dataset.name}"
        remove_stale(
            dataset.cache_directory, f"*{TEXT_SUFFIX}", produced, failed, args.keep_cache, report, label, dataset.recipe
        )


def cache_text(args: argparse.Namespace, task: TaskPreset, processes: Processes = ONE_PROCESS) -> CacheReport:
    datasets = load_dataset_config(args.dataset_config)
    encoder = load_prompt_encoder(
        args.text_encoder_qwen, args.text_encoder_clip, task.dit_params, args.device, args.text_encoder_dtype
    )
    base = {
        "qwen": file_identity(args.text_encoder_qwen),
        "clip": file_identity(args.text_encoder_clip),
        "qwen_dtype": args.text_encoder_dtype,
    }
    report = CacheReport()
    for dataset in datasets:
        cache_dataset(dataset, encoder, task, args, base, report, processes)
    return report
