"""Damaged cache files (cut short, empty, unreadable) named before training starts, with the command
that rebuilds exactly those files; or, when asked, their items left out."""

from __future__ import annotations

import os

from dataset.cache_files import TEXT_SUFFIX, DamagedCache
from dataset.config import load_dataset_config
from dataset.training_data import DatasetSamples, find_samples

REBUILD = {
    "latent": ("kandinsky5_cache_latents.py", "the --task and --vae you cached with"),
    "text": ("kandinsky5_cache_text_encoder_outputs.py", "the --task and text encoder options you cached with"),
}


class DamagedCaches(ValueError):
    pass


def damaged_caches_message(damaged: list[DamagedCache], config: str, option: str, during_training: bool = False) -> str:
    """Every damaged file with its reason, then the caching command(s) whose --skip_existing redoes
    exactly those files (an unreadable cache never counts as up to date)."""
    when = "became unreadable during training (changed on disk since it started)" if during_training else "are damaged"
    lines = [f"{len(damaged)} cache file(s) of {option} {config} {when}:"]
    lines += [f"  {error.path}: {error.why}" for error in damaged]
    kinds = sorted({"text" if error.path.name.endswith(TEXT_SUFFIX) else "latent" for error in damaged})
    lines.append("rebuild them (only these are redone; the others are kept) with --skip_existing:")
    for kind in kinds:
        script, options = REBUILD[kind]
        lines.append(f"  python {script} --dataset_config {config} --skip_existing  (with {options})")
    if not during_training:
        lines.append("or leave their items out of training with --skip_damaged_caches")
    return "\n".join(lines)


def checked_samples(config: str, option: str, skip_damaged: bool) -> list[DatasetSamples]:
    """The cached samples of a dataset config; damaged caches stop the run with one message naming them
    all, or with ``skip_damaged`` their items are left out and listed."""
    datasets = [find_samples(d) for d in load_dataset_config(config)]
    damaged = [error for entry in datasets for error in entry.damaged]
    if damaged and not skip_damaged:
        raise DamagedCaches(damaged_caches_message(damaged, config, option))
    if damaged and int(os.environ.get("RANK", "0")) == 0:  # said once under accelerate launch
        print(f"--skip_damaged_caches: {len(damaged)} damaged cache file(s) of {option} {config}; items left out:")
        for error in damaged:
            print(f"  {error.path}: {error.why}")
    return datasets
