"""The items of a dataset: media files (or folders of frames) with their captions.

An item that cannot be used (no caption, a bad JSONL line) is kept with an ``error`` so it is
reported with its path and reason instead of silently dropped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .config import DatasetConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".gif")


@dataclass
class MediaItem:
    path: Path  # a file, or a folder of frames for a video
    caption: str | None
    error: str | None = None
    control: Path | None = None  # image editing: the source image this target was made from

    @property
    def key(self) -> str:
        """Cache file stem: the file's stem plus a hash of its full path, so two sources with the same
        stem in different folders never share a cache file."""
        digest = hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:8]
        return f"{self.path.stem}-{digest}"


class SourceError(ValueError):
    pass


def _is_frame_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir())


def _caption(path: Path, extension: str | None) -> tuple[str | None, str | None]:
    if extension is None:
        return None, "no caption_extension is set for this dataset"
    caption_file = path.with_name(path.name + extension) if path.is_dir() else path.with_suffix(extension)
    if not caption_file.exists():
        return None, f"no caption file {caption_file.name}"
    try:
        return caption_file.read_text(encoding="utf-8").strip(), None
    except (OSError, UnicodeDecodeError) as error:
        return None, f"cannot read caption file {caption_file.name}: {error}"


def _from_directory(dataset: DatasetConfig) -> list[MediaItem]:
    extensions = IMAGE_EXTENSIONS if dataset.kind == "image" else VIDEO_EXTENSIONS
    paths = [p for p in sorted(dataset.directory.iterdir()) if p.is_file() and p.suffix.lower() in extensions]
    if dataset.kind == "video":
        paths += [p for p in sorted(dataset.directory.iterdir()) if _is_frame_folder(p)]
    items = []
    for path in sorted(paths):
        caption, error = _caption(path, dataset.caption_extension)
        items.append(MediaItem(path, caption, error, _control(path, dataset.control_directory)))
    return items


def _control(target: Path, folder: Path | None) -> Path | None:
    """The source image of ``target`` in ``folder``: the same base name, any image extension."""
    if folder is None:
        return None
    found = [p for p in sorted(folder.glob(f"{target.stem}.*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    return found[0] if found else None


def _from_jsonl(dataset: DatasetConfig) -> list[MediaItem]:
    field = f"{dataset.kind}_path"
    items = []
    try:
        lines = dataset.jsonl_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise SourceError(f"{dataset.jsonl_file} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = Path(f"{dataset.jsonl_file}:{number}")
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            items.append(MediaItem(where, None, f"line {number} is not valid JSON: {error}"))
            continue
        if not isinstance(entry, dict) or field not in entry:
            items.append(MediaItem(where, None, f"line {number} has no {field!r}"))
            continue
        if not isinstance(entry[field], str) or not entry[field]:
            items.append(
                MediaItem(where, None, f"line {number}: {field!r} must be a path (text), got {entry[field]!r}")
            )
            continue
        path = Path(entry[field])
        if not path.is_absolute() and not path.exists():
            path = dataset.jsonl_file.parent / path  # relative to the JSONL file
        caption = entry.get("caption")
        error = None if isinstance(caption, str) else f"line {number} has no 'caption' text"
        control = entry.get("control_path")
        if control is not None and not (isinstance(control, str) and control):
            error = f"line {number}: 'control_path' must be a path (text), got {control!r}"
        elif control is not None:
            control = Path(control)
            if not control.is_absolute() and not control.exists():
                control = dataset.jsonl_file.parent / control
        items.append(MediaItem(path, caption.strip() if isinstance(caption, str) else None, error, control or None))
    return items


def dataset_items(dataset: DatasetConfig) -> list[MediaItem]:
    return _from_directory(dataset) if dataset.directory else _from_jsonl(dataset)
