"""Which items get a caption and where it goes, reading their media, and writing what Qwen wrote.

A directory dataset (or a plain folder) gets ``<name><caption_extension>`` beside each file (for a
folder of frames, ``<folder name><caption_extension>`` beside the folder), as the dataset config
reads captions; a JSONL dataset gets its lines' ``caption`` fields (the file rewritten, every other
field kept). An item that already has a caption is kept unless ``overwrite``. An item whose media
cannot be read is named with the reason and the others are captioned; files are written after each
batch, so a stopped run keeps what it wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

from dataset.config import load_dataset_config
from dataset.sources import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, dataset_items
from modules.atomic_save import atomic_path
from modules.images import eight_bit_rgb

from .captioner import Captioner, Media

FOLDER_FPS = 24.0  # a folder of frames is taken as 24 fps, the models' rate


@dataclass
class Target:
    path: Path
    kind: str  # "image" or "video"
    caption_file: Path | None = None  # directory datasets and folders
    jsonl: tuple[Path, int] | None = None  # (file, line index) for JSONL datasets
    existing: str | None = None


@dataclass
class Summary:
    written: list[tuple[Path, str]] = field(default_factory=list)
    kept: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def line(self) -> str:
        return f"captioned {len(self.written)}, kept {self.kept} existing, failed {len(self.failed)}"


def _caption_file(path: Path, extension: str) -> Path:
    return path.with_name(path.name + extension) if path.is_dir() else path.with_suffix(extension)


def _existing(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None if path.exists() else None
    except (OSError, UnicodeDecodeError):
        return None


def config_targets(config: str | Path) -> list[Target]:
    """Every image and video of a dataset config (image editing controls are not captioned)."""
    targets = []
    for dataset in load_dataset_config(config):
        if dataset.jsonl_file is not None:
            lines = dataset.jsonl_file.read_text(encoding="utf-8").splitlines()
            index = [i for i, line in enumerate(lines) if line.strip()]
            for item, number in zip(dataset_items(dataset), index, strict=True):
                targets.append(Target(item.path, dataset.kind, jsonl=(dataset.jsonl_file, number),
                                      existing=item.caption))  # fmt: skip
            continue
        extension = dataset.caption_extension or ".txt"
        for item in dataset_items(dataset):
            file = _caption_file(item.path, extension)
            targets.append(Target(item.path, dataset.kind, caption_file=file, existing=_existing(file)))
    return targets


def folder_targets(folder: str | Path, extension: str) -> list[Target]:
    """The images, videos and frame folders directly in ``folder``."""
    targets = []
    for path in sorted(Path(folder).iterdir()):
        suffix = path.suffix.lower()
        if path.is_file() and suffix in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
            kind = "image" if suffix in IMAGE_EXTENSIONS else "video"
        elif path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
            kind = "video"
        else:
            continue
        file = _caption_file(path, extension)
        targets.append(Target(path, kind, caption_file=file, existing=_existing(file)))
    return targets


class MediaError(ValueError):
    pass


def read_media(target: Target) -> Media:
    path = target.path
    try:
        if target.kind == "image":
            return Media(image=eight_bit_rgb(ImageOps.exif_transpose(Image.open(path))))
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            return Media(frames=[eight_bit_rgb(Image.open(p)) for p in files], fps=FOLDER_FPS)
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or FOLDER_FPS)
            frames = [frame.to_image().convert("RGB") for frame in container.decode(video=0)]
    except Exception as error:  # Pillow and PyAV raise many error types for damaged files
        raise MediaError(f"cannot read {path}: {str(error) or type(error).__name__}") from None
    if not frames:
        raise MediaError(f"{path} has no decodable video frames")
    return Media(frames=frames, fps=fps)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _write_jsonl(file: Path, captions: dict[int, str]) -> None:
    lines = file.read_text(encoding="utf-8").splitlines()
    for number, caption in captions.items():
        entry = json.loads(lines[number])
        entry["caption"] = caption
        lines[number] = json.dumps(entry, ensure_ascii=False)
    write_text_atomic(file, "\n".join(lines) + "\n")


def write(target: Target, caption: str) -> None:
    if target.caption_file is not None:
        write_text_atomic(target.caption_file, caption + "\n")
    else:
        file, number = target.jsonl
        _write_jsonl(file, {number: caption})


def caption_targets(
    captioner: Captioner, targets: list[Target], batch_size: int, overwrite: bool, save: bool = True
) -> Summary:
    """Caption every target that needs it (``save``: write each batch's captions as soon as it is done)."""
    summary = Summary()
    todo = [t for t in targets if overwrite or not t.existing]
    summary.kept = len(targets) - len(todo)
    with tqdm(total=len(todo), desc="captioning", unit="item") as bar:
        for start in range(0, len(todo), batch_size):
            batch, media = [], []
            for target in todo[start : start + batch_size]:
                try:
                    media.append(read_media(target))
                    batch.append(target)
                except MediaError as error:
                    summary.failed.append((target.path, str(error)))
                    bar.update(1)
            if not batch:
                continue
            for target, caption in zip(batch, captioner.caption(media), strict=True):
                if save:
                    write(target, caption)
                summary.written.append((target.path, caption))
                bar.update(1)
    return summary


def caption_with_qwen(
    targets: list[Target], qwen_path: str | Path, settings, batch_size: int = 1, overwrite: bool = False, save=True
) -> Summary:
    """Load Qwen (bf16 on the GPU when there is one, else fp32 on the CPU) and caption ``targets``."""
    import torch

    from kandinsky5.encoders.text_encoders import QwenEncoder, lm_head_missing

    from .captioner import Captioner

    missing = lm_head_missing(qwen_path)
    if missing:
        raise ValueError(missing)
    cuda = torch.cuda.is_available()
    qwen = QwenEncoder(qwen_path, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    return caption_targets(Captioner(qwen, settings), targets, batch_size, overwrite, save)
