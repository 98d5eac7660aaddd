"""Cache files: what the caching scripts write and training reads.

Latents, one file per image or video clip::

    {key}_{W:04d}x{H:04d}_k5tk.safetensors                     images
    {key}_{start:05d}-{frames:03d}_{W:04d}x{H:04d}_k5tk.safetensors   video clips
      latent        (T, H/8, W/8, 16) float32, the scaled VAE latent
      first_frame   (1, H/8, W/8, 16) float32, clips only: frame ``start`` encoded alone, as I2V
                    generation encodes its first frame
      last_frame    (1, H/8, W/8, 16) float32, clips only: the clip's last frame encoded alone, as
                    generation encodes --image_last (caches written before it existed lack it)

Text, one file per image or video (all clips of a video share it)::

    {key}_k5tk_te.safetensors
      text          (L, hidden) the Qwen features of the caption's L tokens (no padding)
      pooled        (hidden2,) float32, CLIP's pooled output

``key`` is the source's stem plus a hash of its full path. Every file's metadata holds
``format_version``, ``kind`` and a ``fingerprint`` (JSON) of everything its content depends on;
``--skip_existing`` skips an item only when the stored fingerprint equals the new one, and ``writer``
names this toolkit: stale-cache cleanup deletes only files that carry it.

The suffixes are ours alone: musubi-tuner's Kandinsky 5 caches end in ``_k5.safetensors`` and
``_k5_te.safetensors`` with another layout, so a cache folder shared with it keeps both tools' files
apart (``FOREIGN_SUFFIXES``: found where ours are missing, they are named in the error).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from modules.atomic_save import save_safetensors_atomic

FORMAT_VERSION = "1"
LATENT_SUFFIX = "_k5tk.safetensors"
TEXT_SUFFIX = "_k5tk_te.safetensors"
FOREIGN_SUFFIXES = {"_k5.safetensors": "musubi-tuner", "_k5_te.safetensors": "musubi-tuner"}
WRITER = "kandinsky5-toolkit"
LATENT_TENSORS = ("latent",)
TEXT_TENSORS = ("text", "pooled")


class DamagedCache(ValueError):
    """A cache file that cannot be read: cut short, empty, not safetensors, or without its tensors."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = Path(path), why


def latent_cache_name(key: str, size: tuple[int, int], clip: tuple[int, int] | None = None) -> str:
    clip_part = f"_{clip[0]:05d}-{clip[1]:03d}" if clip else ""
    return f"{key}{clip_part}_{size[0]:04d}x{size[1]:04d}{LATENT_SUFFIX}"


def text_cache_name(key: str) -> str:
    return f"{key}{TEXT_SUFFIX}"


# <stem>-<8 hex digits of the path's hash>, then a clip's _<start>-<frames>, then _<W>x<H>: the key is
# anchored on its hash, so no stem (digits, dashes and underscores included) can be taken for a field
LATENT_NAME = re.compile(r"(?P<key>.+-[0-9a-f]{8})(?:_\d{5,}-\d{3,})?_\d{4,}x\d{4,}" + re.escape(LATENT_SUFFIX))


def item_key_of(cache_file: Path) -> str:
    """The item key a cache file belongs to (the part before the clip / size / suffix fields)."""
    name = cache_file.name
    if name.endswith(TEXT_SUFFIX):
        return name[: -len(TEXT_SUFFIX)]
    match = LATENT_NAME.fullmatch(name)
    return match["key"] if match else name[: -len(LATENT_SUFFIX)]


def file_identity(path: str | Path) -> str:
    """A cheap identity of a file or a folder's files: names, sizes and modification times."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    parts = [f"{p.relative_to(path) if p != path else p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def source_fingerprint(path: Path) -> dict:
    stat = os.stat(path)
    if path.is_dir():
        return {"source": str(path.resolve()), "identity": file_identity(path)}
    return {"source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def caption_hash(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


def write_cache(
    path: Path, tensors: dict[str, torch.Tensor], kind: str, fingerprint: dict, extra: dict[str, str] | None = None
) -> None:
    tensors = {k: t.contiguous() for k, t in tensors.items()}
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "writer": WRITER,
    }
    metadata.update(extra or {})
    save_safetensors_atomic(tensors, path, metadata=metadata)


def stored_fingerprint(path: Path) -> dict | None:
    """The fingerprint of an existing cache file; None when it is absent, unreadable or of another format."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:
        return None
    if metadata.get("format_version") != FORMAT_VERSION or "fingerprint" not in metadata:
        return None
    return json.loads(metadata["fingerprint"])


def written_by_us(path: Path) -> bool:
    """Whether ``path`` is a cache file this toolkit wrote (cleanup never deletes anything else)."""
    return cache_metadata(path).get("writer") == WRITER


def cache_metadata(path: Path) -> dict[str, str]:
    """A cache file's metadata; empty when it cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return {}


def recipes_of(metadata: dict[str, str]) -> set[str] | None:
    """The recipes (dataset configs, see DatasetConfig.recipe) a cache file serves; None for a file written
    before caches carried them, which serves any."""
    text = metadata.get("recipes")
    return set(json.loads(text)) if text else None


def serves(metadata: dict[str, str], recipe: str) -> bool:
    recipes = recipes_of(metadata)
    return recipes is None or recipe in recipes


def recipes_with(path: Path, recipe: str) -> str:
    """The recipes a new file at ``path`` carries: those of the file it replaces, and ``recipe``."""
    return json.dumps(sorted((recipes_of(cache_metadata(path)) or set()) | {recipe}))


def set_recipes(path: Path, recipes: set[str]) -> None:
    """Rewrite a cache file with these recipes (its tensors and other metadata as they are)."""
    tensors, metadata = read_cache(path)
    save_safetensors_atomic(tensors, path, metadata={**metadata, "recipes": json.dumps(sorted(recipes))})


def add_recipe(path: Path, recipe: str) -> None:
    """An up-to-date file that another config wrote now serves this one's as well."""
    recipes = recipes_of(cache_metadata(path))
    if recipes is None or recipe not in recipes:
        set_recipes(path, (recipes or set()) | {recipe})


def foreign_caches(folder: Path) -> list[tuple[Path, str]]:
    """Cache files of other tools in ``folder``, with the tool's name."""
    found = []
    for suffix, tool in FOREIGN_SUFFIXES.items():
        found += [(path, tool) for path in sorted(folder.glob(f"*{suffix}"))]
    return found


def is_current(path: Path, fingerprint: dict) -> bool:
    return stored_fingerprint(path) == json.loads(json.dumps(fingerprint, sort_keys=True))


@dataclass(frozen=True)
class CacheHeader:
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]


def read_header(path: Path, tensors: tuple[str, ...]) -> CacheHeader:
    """A cache file's metadata and tensor shapes, from its header; DamagedCache when the header or the
    data's length against it (what a copy cut short or a full disk leaves) is wrong, or a tensor is
    missing. Not every value is read."""
    try:
        if path.stat().st_size == 0:
            raise DamagedCache(path, "the file is empty")
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            metadata = f.metadata() or {}
    except SafetensorError as error:
        raise DamagedCache(path, f"cut short or damaged ({error})") from None
    except OSError as error:
        raise DamagedCache(path, f"cannot be read ({error.strerror or error})") from None
    missing = [name for name in tensors if name not in shapes]
    if missing:
        raise DamagedCache(path, f"it holds no {' or '.join(missing)} tensor")
    return CacheHeader(metadata, shapes)


def cache_damage(path: Path, tensors: tuple[str, ...]) -> str | None:
    """Why the cache file ``path`` cannot be read, or None when it can (see read_header)."""
    try:
        read_header(path, tensors)
    except DamagedCache as damaged:
        return damaged.why
    return None


def read_tensors(path: Path, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The named tensors of a cache file (``optional`` ones where present); DamagedCache names the file
    when it cannot be read, e.g. when it was changed after training checked it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            return {name: f.get_tensor(name) for name in names + optional if name in names or name in keys}
    except (SafetensorError, OSError) as error:
        raise DamagedCache(path, cache_damage(path, names) or f"cannot be read ({error})") from None


def read_cache(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
