"""Encode the captions of dataset configs to text-encoder cache files."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from dataset.cache_files import TEXT_SUFFIX, caption_hash, file_identity, is_current, text_cache_name, write_cache
from dataset.caching import CacheReport, remove_stale
from dataset.config import DatasetConfig, load_dataset_config
from dataset.sources import MediaItem, dataset_items
from kandinsky5.encoders.prompt_templates import TEMPLATES
from kandinsky5.encoders.text_encoders import PromptEncoder, load_prompt_encoder
from kandinsky5.model.tasks import TaskPreset
from modules.atomic_save import remove_leftovers


def template_name(dataset: DatasetConfig) -> str:
    """Videos are encoded as generation encodes video prompts, images as it encodes 1-frame prompts."""
    return "video" if dataset.kind == "video" else "image"


def cache_dataset(
    dataset: DatasetConfig,
    encoder: PromptEncoder,
    task: TaskPreset,
    args: argparse.Namespace,
    base: dict,
    report: CacheReport,
) -> None:
    template = TEMPLATES[template_name(dataset)]
    settings = {
        **base,
        "template": template.name,
        "max_length": task.qwen_max_length,
        "crop": encoder.qwen.crop_length(template),
    }
    dataset.cache_directory.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dataset.cache_directory)  # hidden files of writes that were killed
    produced: set[Path] = set()
    failed: set[str] = set()
    todo: list[tuple[MediaItem, Path, dict]] = []
    for item in dataset_items(dataset):
        if item.error or not item.path.exists():
            report.fail(item.path, item.error or "file not found")
            failed.add(item.key)
            continue
        path = dataset.cache_directory / text_cache_name(item.key)
        fingerprint = {**settings, "caption": caption_hash(item.caption)}
        produced.add(path)
        if args.skip_existing and is_current(path, fingerprint):
            report.skipped += 1
        else:
            todo.append((item, path, fingerprint))
    batch_size = args.batch_size or dataset.batch_size
    with tqdm(total=len(todo), desc=f"captions: {dataset.name}", unit="caption") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            encoded = encoder.encode([item.caption for item, _, _ in batch], template, task.qwen_max_length)
            for i, (item, path, fingerprint) in enumerate(batch):
                length = int(encoded.mask[i].sum())
                if length >= task.qwen_max_length:
                    tqdm.write(
                        f"warning: the caption of {item.path} reaches the text encoder's limit of "
                        f"{task.qwen_max_length} tokens: {length} kept, the rest of it cut"
                    )
                tensors = {"text": encoded.embeddings[i, :length].cpu(), "pooled": encoded.pooled[i].cpu()}
                try:
                    write_cache(
                        path, tensors, "text", fingerprint, {"caption": item.caption, "template": template.name}
                    )
                except OSError as error:  # the disk is full, say: this item fails, the others go on
                    report.fail(item.path, f"cannot write {path.name}: {error.strerror or error}")
                    failed.add(item.key)
                    continue
                report.written += 1
            bar.update(len(batch))
    remove_stale(
        dataset.cache_directory, f"*{TEXT_SUFFIX}", produced, failed, args.keep_cache, report, f"text of {dataset.name}"
    )


def cache_text(args: argparse.Namespace, task: TaskPreset) -> CacheReport:
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
        cache_dataset(dataset, encoder, task, args, base, report)
    return report
