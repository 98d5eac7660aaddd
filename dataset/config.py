"""The dataset config file (TOML or JSON), validated with voluptuous.

Keys and meanings follow musubi-tuner's dataset config, so an existing file loads unchanged:

    [general]            resolution, caption_extension, batch_size, num_repeats, enable_bucket, bucket_no_upscale
    [[datasets]]         the general keys, plus
      images:            image_directory | image_jsonl_file, cache_directory, control_directory
      videos:            video_directory | video_jsonl_file, cache_directory, target_frames, frame_extraction,
                         frame_stride, frame_sample, max_frames, source_fps

A dataset value overrides the general one. ``control_directory`` (image datasets) holds the source
images of image-editing pairs, named as their targets. Keys of other architectures (FramePack,
control options) are accepted with a warning that they do nothing here. Every error names the file, the dataset and
the key, and says what was expected.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import toml
import voluptuous as v

FRAME_EXTRACTION = ("head", "chunk", "slide", "uniform", "full")
IGNORED_KEYS = (
    "control_directory",
    "multiple_target",
    "no_resize_control",
    "control_resolution",
    "fp_latent_window_size",
    "fp_1f_clean_indices",
    "fp_1f_target_index",
    "fp_1f_no_post",
)


class DatasetConfigError(ValueError):
    pass


def _number(value: Any) -> float:
    """A float key that also takes TOML integers (source_fps = 30)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise v.Invalid("expected a number")
    return float(value)


MIN_SIDE, MAX_SIDE = 16, 8192  # pixels


def _integer(low: int, high: int | None = None):
    """An integer key in [low, high]; TOML's true/false are not integers (Python counts them as 0/1)."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise v.Invalid("expected an integer")
        if value < low or (high is not None and value > high):
            raise v.Invalid(f"expected an integer {'>= ' + str(low) if high is None else f'in [{low}, {high}]'}")
        return value

    return check


def _resolution(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not (isinstance(value, list | tuple) and len(value) == 2) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in value
    ):
        raise v.Invalid("expected an integer or a list [width, height]")
    if not all(MIN_SIDE <= x <= MAX_SIDE for x in value):
        raise v.Invalid(f"expected sides of {MIN_SIDE} to {MAX_SIDE} pixels, got {list(value)}")
    return (value[0], value[1])


def _caption_extension(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(".") or len(value) < 2 or "/" in value:
        raise v.Invalid(f'expected a file extension starting with a dot, such as ".txt", got {value!r}')
    return value


def _target_frames(value: Any) -> list[int]:
    """Positive integers (4k+1 is enforced by ``four_k_plus_one``, which rounds with a warning)."""
    if not isinstance(value, list) or not value or not all(isinstance(x, int) and x > 0 for x in value):
        raise v.Invalid("expected a list of positive integers")
    return value


def four_k_plus_one(frames: list[int], where: str) -> list[int]:
    """Each value rounded down to 4k+1, with a warning for each one changed (as musubi-tuner does)."""
    rounded = []
    for value in frames:
        low = (value - 1) // 4 * 4 + 1
        if low != value:
            print(
                f"note: {where}: target_frames value {value} is not 4k+1 (1, 5, 9, 13, 17, ...); using {low}",
                file=sys.stderr,
            )
        rounded.append(low)
    return sorted(set(rounded))


COMMON = {
    v.Optional("resolution"): _resolution,
    v.Optional("caption_extension"): _caption_extension,
    v.Optional("batch_size"): _integer(1, 1024),
    v.Optional("num_repeats"): _integer(1, 100_000),
    v.Optional("enable_bucket"): bool,
    v.Optional("bucket_no_upscale"): bool,
}
IGNORED = {v.Optional(key): object for key in IGNORED_KEYS}
IMAGE = {
    **COMMON,
    **IGNORED,
    v.Optional("image_directory"): str,
    v.Optional("image_jsonl_file"): str,
    v.Optional("cache_directory"): str,
}
VIDEO = {
    **COMMON,
    **IGNORED,
    v.Optional("video_directory"): str,
    v.Optional("video_jsonl_file"): str,
    v.Optional("cache_directory"): str,
    v.Optional("target_frames"): _target_frames,
    v.Optional("frame_extraction"): v.In(FRAME_EXTRACTION, msg=f"expected one of {', '.join(FRAME_EXTRACTION)}"),
    v.Optional("frame_stride"): _integer(1),
    v.Optional("frame_sample"): _integer(1, 1025),
    v.Optional("max_frames"): _integer(1, 1025),
    v.Optional("source_fps"): v.All(_number, v.Range(min=1, max=1000, msg="expected frames per second in [1, 1000]")),
}


@dataclass
class DatasetConfig:
    index: int  # position in the file, from 0
    kind: str  # "image" or "video"
    directory: Path | None
    jsonl_file: Path | None
    cache_directory: Path
    resolution: tuple[int, int] = (960, 544)
    caption_extension: str | None = ".txt"
    batch_size: int = 1
    num_repeats: int = 1
    enable_bucket: bool = False
    bucket_no_upscale: bool = False
    target_frames: list[int] = field(default_factory=lambda: [1])
    frame_extraction: str = "head"
    frame_stride: int = 1
    frame_sample: int = 1
    max_frames: int = 129
    source_fps: float | None = None
    control_directory: Path | None = None  # image editing: the source image of each target, by name

    @property
    def source(self) -> Path:
        return self.directory or self.jsonl_file

    @property
    def name(self) -> str:
        return f"dataset {self.index} ({self.source})"

    @property
    def recipe(self) -> str:
        """What this dataset's cache files depend on besides each item: its source and how clips and sizes
        are made. Caches carry it, so that another config sharing the cache_directory (other target_frames,
        say) neither reads nor deletes them."""
        parts = [self.kind, str(self.source.resolve()), self.resolution, self.enable_bucket, self.bucket_no_upscale]
        parts += [self.target_frames, self.frame_extraction, self.frame_stride, self.frame_sample, self.max_frames]
        parts += [self.source_fps, str(self.control_directory)]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _where(path: Path, error: v.Invalid) -> str:
    keys = [str(p) for p in error.path]
    if keys[:1] == ["datasets"] and len(keys) > 1:
        return f"{path}: [[datasets]] number {int(keys[1]) + 1}" + (f", key {keys[2]!r}" if len(keys) > 2 else "")
    if keys[:1] == ["general"]:
        return f"{path}: [general]" + (f", key {keys[1]!r}" if len(keys) > 1 else "")
    return f"{path}: key {'.'.join(keys)!r}" if keys else str(path)


def _read(path: Path) -> dict:
    if not path.exists():
        raise DatasetConfigError(f"dataset config {path} does not exist")
    if not path.is_file():
        raise DatasetConfigError(f"dataset config {path} is a folder; give the .toml or .json file")
    try:
        if path.suffix.lower() == ".toml":
            return toml.loads(path.read_text(encoding="utf-8"))
        if path.suffix.lower() == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise DatasetConfigError(
            f"dataset config {path} is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    except (toml.TomlDecodeError, json.JSONDecodeError) as error:
        raise DatasetConfigError(f"dataset config {path} is not valid {path.suffix[1:].upper()}: {error}") from None
    raise DatasetConfigError(f"dataset config {path} must be a .toml or .json file")


def _validate(path: Path, raw: dict) -> dict:
    """The config with every value checked and converted (ints to floats, resolutions to pairs)."""
    try:
        checked = v.Schema({v.Optional("general"): v.Schema(COMMON), v.Optional("datasets"): list})(raw)
        datasets = []
        for i, entry in enumerate(checked.get("datasets", [])):
            if not isinstance(entry, dict):
                raise v.Invalid("expected a table", path=["datasets", i])
            is_video = "video_directory" in entry or "video_jsonl_file" in entry
            try:
                datasets.append(v.Schema(VIDEO if is_video else IMAGE)(entry))
            except v.Invalid as error:
                error.path[:0] = ["datasets", i]
                raise
        checked["datasets"] = datasets
    except v.MultipleInvalid as errors:
        error = errors.errors[0]
        raise DatasetConfigError(f"{_where(path, error)}: {_message(error)}") from None
    except v.Invalid as error:
        raise DatasetConfigError(f"{_where(path, error)}: {_message(error)}") from None
    return checked


def _message(error: v.Invalid) -> str:
    if error.error_message == "extra keys not allowed":
        return "unknown key (check its spelling; cache_directory and the video keys belong in [[datasets]])"
    return error.error_message


def load_dataset_config(path: str | Path) -> list[DatasetConfig]:
    """The datasets of a config file, validated, with general values applied and paths checked."""
    path = Path(path)
    raw = _validate(path, _read(path))
    general = raw.get("general", {})
    datasets: list[DatasetConfig] = []
    for i, entry in enumerate(raw.get("datasets", [])):
        values = {**general, **entry}
        kind = "video" if "video_directory" in values or "video_jsonl_file" in values else "image"
        control = values.pop("control_directory", None) if kind == "image" else None  # image editing pairs
        for key in IGNORED_KEYS:
            if key in values:
                print(
                    f"note: {path}: [[datasets]] number {i + 1}: {key!r} has no effect for Kandinsky 5", file=sys.stderr
                )
                values.pop(key)
        directory, jsonl = values.pop(f"{kind}_directory", None), values.pop(f"{kind}_jsonl_file", None)
        where = f"{path}: [[datasets]] number {i + 1}"
        if "target_frames" in values:
            values["target_frames"] = four_k_plus_one(values["target_frames"], where)
        if directory is None and jsonl is None:
            raise DatasetConfigError(
                f"{where}: give image_directory, image_jsonl_file, video_directory or video_jsonl_file"
            )
        source = Path(directory or jsonl)
        key = f"{kind}_directory" if directory else f"{kind}_jsonl_file"
        if not source.exists():
            raise DatasetConfigError(f"{where}: {key} {str(source)!r} does not exist")
        if directory and not source.is_dir():
            raise DatasetConfigError(f"{where}: {key} {str(source)!r} is a file, not a folder")
        if jsonl and not source.is_file():
            raise DatasetConfigError(f"{where}: {key} {str(source)!r} is a folder, not a JSONL file")
        cache = values.pop("cache_directory", None) or (directory if directory else None)
        if cache is None:
            raise DatasetConfigError(f"{where}: a JSONL dataset needs a cache_directory")
        if Path(cache).exists() and not Path(cache).is_dir():
            raise DatasetConfigError(f"{where}: cache_directory {cache!r} is a file, not a folder")
        if control is not None and not Path(control).is_dir():
            raise DatasetConfigError(f"{where}: control_directory {str(control)!r} is not a folder")
        if not values.get("enable_bucket", False):
            values["bucket_no_upscale"] = False
        dataset = DatasetConfig(
            index=i,
            kind=kind,
            directory=Path(directory) if directory else None,
            jsonl_file=Path(jsonl) if jsonl else None,
            cache_directory=Path(cache),
            control_directory=Path(control) if control is not None else None,
            **values,
        )
        if dataset.frame_extraction == "uniform" and dataset.frame_sample == 1:
            dataset.frame_extraction = "head"
        datasets.append(dataset)
    caches = [d.cache_directory.resolve() for d in datasets]
    for i, cache in enumerate(caches):
        if caches.index(cache) != i:
            raise DatasetConfigError(
                f"{path}: datasets number {caches.index(cache) + 1} and {i + 1} share the "
                f"cache_directory {str(cache)!r}; each dataset needs its own"
            )
    if not datasets:
        raise DatasetConfigError(f"{path}: no [[datasets]]")
    return datasets
