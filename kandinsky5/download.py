"""Download exactly the weights a task needs into the layout of docs/weights.md.

    python -m kandinsky5.download --task k5-lite-t2v-5s-sd [weights]

Fetches the task's DiT, its VAE (HunyuanVideo for video tasks, FLUX.1 for image tasks),
Qwen2.5-VL-7B-Instruct and the CLIP-L text tower from Hugging Face, through huggingface_hub: progress
bars, interrupted downloads resume, HF_TOKEN (or `hf auth login`) is used for gated repositories
(FLUX.1-dev asks you to accept its license first), HF_HUB_OFFLINE=1 takes what the Hugging Face
cache holds. Files land in the Hugging Face cache and are hard-linked into the weights folder (no
second copy; copied when the two are on different disks). What the weights folder already holds
is skipped, so a second run downloads nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlparse

from kandinsky5.cli import add_task_argument
from kandinsky5.model.tasks import TaskPreset
from modules.option_types import ScriptParser
from modules.output_paths import OutputPathError, check_writable_folder

QWEN_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"
QWEN_FILES = ["*.json", "*.txt", "*.safetensors"]  # config, tokenizer, processor, weights (not the READMEs)
CLIP_REPO, CLIP_FILE = "Comfy-Org/HunyuanVideo_repackaged", "split_files/text_encoders/clip_l.safetensors"
HUNYUAN_VAE_REPO = "hunyuanvideo-community/HunyuanVideo"
FLUX_REPO = "black-forest-labs/FLUX.1-dev"
VAE_FILES = ("vae/config.json", "vae/diffusion_pytorch_model.safetensors")

# checkpoint file (without .safetensors) -> the repository that publishes it under model/
DIT_REPOS = {
    "kandinsky5lite_t2v_sft_5s": "Kandinsky-5.0-T2V-Lite-sft-5s",
    "kandinsky5lite_t2v_sft_10s": "Kandinsky-5.0-T2V-Lite-sft-10s",
    "kandinsky5lite_t2v_pretrain_5s": "Kandinsky-5.0-T2V-Lite-pretrain-5s",
    "kandinsky5lite_t2v_pretrain_10s": "Kandinsky-5.0-T2V-Lite-pretrain-10s",
    "kandinsky5lite_t2v_nocfg_5s": "Kandinsky-5.0-T2V-Lite-nocfg-5s",
    "kandinsky5lite_t2v_nocfg_10s": "Kandinsky-5.0-T2V-Lite-nocfg-10s",
    "kandinsky5lite_t2v_distilled16steps_5s": "Kandinsky-5.0-T2V-Lite-distilled16steps-5s",
    "kandinsky5lite_t2v_distilled16steps_10s": "Kandinsky-5.0-T2V-Lite-distilled16steps-10s",
    "kandinsky5lite_i2v_5s": "Kandinsky-5.0-I2V-Lite-5s",
    "kandinsky5pro_t2v_sft_5s": "Kandinsky-5.0-T2V-Pro-sft-5s",
    "kandinsky5pro_t2v_sft_10s": "Kandinsky-5.0-T2V-Pro-sft-10s",
    "kandinsky5pro_i2v_sft_5s": "Kandinsky-5.0-I2V-Pro-sft-5s",
    "kandinsky5pro_t2v_pretrain_5s": "Kandinsky-5.0-T2V-Pro-pretrain-5s",
    "kandinsky5pro_t2v_pretrain_10s": "Kandinsky-5.0-T2V-Pro-pretrain-10s",
    "kandinsky5lite_t2i": "Kandinsky-5.0-T2I-Lite",
    "kandinsky5lite_i2i": "Kandinsky-5.0-I2I-Lite",
}
# checkpoints published in the diffusers layout only -> their repository, whose transformer/ is the DiT folder
DIFFUSERS_DIT_REPOS = {
    "kandinsky5pro_t2v_distilled_5s": "Kandinsky-5.0-T2V-Pro-distilled-5s-Diffusers",
    "kandinsky5pro_i2v_distilled_5s": "Kandinsky-5.0-I2V-Pro-distilled-5s-Diffusers",
    "kandinsky5lite_t2i_pretrain": "Kandinsky-5.0-T2I-Lite-pretrain-Diffusers",
    "kandinsky5lite_i2i_pretrain": "Kandinsky-5.0-I2I-Lite-pretrain-Diffusers",
}
DIFFUSERS_DIT_FILES = ("transformer/*.json", "transformer/*.safetensors")
ORGANIZATION = "kandinskylab"


class DownloadError(RuntimeError):
    pass


@dataclass(frozen=True)
class Fetch:
    """Files ``sources`` of ``repo`` (glob patterns when ``whole_folder``) placed as ``targets``."""

    what: str
    repo: str
    sources: tuple[str, ...]
    targets: tuple[Path, ...]
    whole_folder: Path | None = None  # for a repository (or its ``subfolder``) taken whole: where its files go
    subfolder: str = ""


def dit_fetch(task: TaskPreset, weights: Path) -> Fetch:
    if task.diffusers_layout:
        if task.checkpoint not in DIFFUSERS_DIT_REPOS:
            raise DownloadError(f"task {task.name}: no published repository holds {task.checkpoint}")
        repo = f"{ORGANIZATION}/{DIFFUSERS_DIT_REPOS[task.checkpoint]}"
        folder = weights / "model" / task.checkpoint
        return Fetch("DiT", repo, DIFFUSERS_DIT_FILES, (), whole_folder=folder, subfolder="transformer")
    stem = task.checkpoint.removesuffix(".safetensors")
    if stem not in DIT_REPOS:
        raise DownloadError(f"task {task.name}: no published repository holds {task.checkpoint}")
    path = weights / "model" / task.checkpoint
    return Fetch("DiT", f"{ORGANIZATION}/{DIT_REPOS[stem]}", (f"model/{task.checkpoint}",), (path,))


def plan(task: TaskPreset, weights: Path) -> list[Fetch]:
    dit = dit_fetch(task, weights)
    vae_repo, vae_folder = (
        (HUNYUAN_VAE_REPO, weights / "vae") if task.vae == "hunyuan" else (FLUX_REPO, weights / "flux" / "vae")
    )
    return [
        dit,
        Fetch(f"{task.vae} VAE", vae_repo, VAE_FILES, tuple(vae_folder / Path(f).name for f in VAE_FILES)),
        Fetch("Qwen2.5-VL-7B-Instruct", QWEN_REPO, tuple(QWEN_FILES), (), whole_folder=weights / "text_encoder"),
        Fetch("CLIP-L", CLIP_REPO, (CLIP_FILE,), (weights / "text_encoder2" / "clip_l.safetensors",)),
    ]


def folder_complete(item: Fetch) -> bool:
    """The folder holds the config (Qwen: its tokenizer and processor config too) and every weight file:
    the shards its index lists, or the one file without an index, each of the repository's size."""
    folder, prefix = item.whole_folder, f"{item.subfolder}/" if item.subfolder else ""
    qwen = item.repo == QWEN_REPO
    needed = ["config.json", "tokenizer.json", "preprocessor_config.json"] if qwen else ["config.json"]
    single = "model.safetensors" if qwen else "diffusion_pytorch_model.safetensors"
    index = f"{single.removesuffix('.safetensors')}.safetensors.index.json"
    if (folder / index).is_file():
        try:
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
        except (ValueError, KeyError):
            return False  # a damaged index: fetched again
        needed += [index, *sorted(shards)]
    else:
        needed.append(single)
    return all(
        (folder / name).is_file() and not content_mismatch(folder / name, item.repo, prefix + name) for name in needed
    )


HASH_RECORD = ".download_checks.json"  # in the weights folder: files whose hash was checked (path, size, mtime)


def expected_file(repo: str, source: str) -> tuple[int | None, str | None, Path | None]:
    """(size, hash, cached path) of the repository's ``source``: from the Hugging Face cache, else from the
    hub when it can be reached. The hash is the file's etag: sha256 for large (LFS) files, the git blob
    sha1 for small ones; a cache entry keeps a large file under its sha256."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, source)
    if isinstance(cached, str):
        blob = Path(cached).resolve()
        return blob.stat().st_size, blob.name if len(blob.name) in (40, 64) else None, blob
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return None, None, None
    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, source))
    except Exception:  # no answer from the hub: nothing to compare with
        return None, None, None
    etag = (meta.etag or "").removeprefix("W/").strip('"') or None
    return meta.size, etag, None


def file_hash(path: Path, kind: int) -> str:
    """sha256 (``kind`` 64) or the git blob sha1 (``kind`` 40) of a file, read in 16 MiB pieces."""
    from tqdm import tqdm

    size = path.stat().st_size
    digest = hashlib.sha256() if kind == 64 else hashlib.sha1(f"blob {size}\0".encode())
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"checking {path.name}", disable=size < 1 << 30)
    with open(path, "rb") as f, bar:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def content_mismatch(target: Path, repo: str, source: str) -> bool:
    """Whether a file already in the weights folder differs from the repository's: in size (cut short by an
    interrupted copy, say), or in its hash when one is known. It is said, and the caller fetches the file
    again. A file that is the cached file itself (a hard link) is the same; a hash checked once is recorded
    (HASH_RECORD) with the file's size and time, so it is not read again. Without a cache entry or a hub to
    ask, a present file is taken as it is."""
    size, etag, blob = expected_file(repo, source)
    found = target.stat().st_size
    if size is not None and found != size:
        print(f"{target} is {found} bytes, {repo}'s {source} {size}: fetching it again")
        return True
    if etag is None or len(etag) not in (40, 64) or (blob is not None and os.path.samefile(blob, target)):
        return False
    record_file = target.parent / HASH_RECORD
    try:
        records = json.loads(record_file.read_text())
    except (OSError, ValueError):
        records = {}
    stamp = f"{found}:{target.stat().st_mtime_ns}:{etag}"
    if records.get(target.name) == stamp:
        return False
    if file_hash(target, len(etag)) != etag:
        print(f"{target} differs from {repo}'s {source} (its hash is not {etag}): fetching it again")
        return True
    records[target.name] = stamp
    try:
        record_file.write_text(json.dumps(records, indent=1))
    except OSError:
        pass  # a read-only folder: checked again next time
    return False


def place(source: Path, target: Path) -> None:
    """``target`` becomes the cached file: a hard link, or a copy across disks; written whole or not at all."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.k5tmp")
        partial.unlink(missing_ok=True)
        try:
            os.link(source.resolve(), partial)
        except OSError:
            shutil.copyfile(source, partial)
        os.replace(partial, target)
    except OSError as error:  # a file where a folder belongs, a read-only folder, a full disk
        raise DownloadError(f"cannot place {target}: {error.strerror or error}") from None


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the hub (HF_ENDPOINT, as huggingface_hub uses it) opens in ``timeout`` s."""
    url = urlparse(hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def fetch(item: Fetch) -> int:
    """Download ``item`` unless present; returns the number of files placed."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        if item.whole_folder is not None:
            if folder_complete(item):
                print(f"{item.what}: present in {item.whole_folder}")
                return 0
            snapshot = Path(snapshot_download(item.repo, allow_patterns=list(item.sources)))
            root = snapshot / item.subfolder if item.subfolder else snapshot
            # (a cached snapshot may hold more than was asked for: the same patterns pick the files)
            files = [
                p
                for p in sorted(snapshot.rglob("*"))
                if p.is_file() and any(fnmatch(p.relative_to(snapshot).as_posix(), pattern) for pattern in item.sources)
            ]
            for file in files:
                place(file, item.whole_folder / file.relative_to(root))
            print(f"{item.what}: {len(files)} files in {item.whole_folder}")
            return len(files)
        missing = [
            (s, t)
            for s, t in zip(item.sources, item.targets, strict=True)
            if not t.is_file() or content_mismatch(t, item.repo, s)
        ]
        if not missing:
            print(f"{item.what}: present ({', '.join(str(t) for t in item.targets)})")
            return 0
        for source, target in missing:
            place(Path(hf_hub_download(item.repo, source)), target)
            print(f"{item.what}: {target}")
        return len(missing)
    except GatedRepoError:
        raise DownloadError(
            f"{item.repo} is gated: accept its license on https://huggingface.co/{item.repo} with your account, "
            "then set HF_TOKEN (or run `hf auth login`) and run this again"
        ) from None
    except RepositoryNotFoundError:
        raise DownloadError(f"{item.repo} was not found on Hugging Face (or needs a token: set HF_TOKEN)") from None
    except LocalEntryNotFoundError as error:
        raise DownloadError(
            f"{item.what} from {item.repo}: not in the Hugging Face cache and no connection to download it "
            f"(HF_HUB_OFFLINE is {os.environ.get('HF_HUB_OFFLINE', 'not set')}): {error}"
        ) from None


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(
        prog="python -m kandinsky5.download", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_task_argument(parser, default="k5-lite-t2v-5s-sd", role="its DiT, VAE and text encoders are fetched")
    parser.add_argument("folder", nargs="?", default="weights", help="the weights folder (default: weights)")
    parser.add_argument("--dry_run", action="store_true", help="list what would be fetched and where, then stop")
    args = parser.parse_args(argv)
    weights = Path(args.folder)
    try:
        check_writable_folder(weights, "the weights folder")
        items = plan(args.task, weights)
        if args.dry_run:
            for item in items:
                where = item.whole_folder or ", ".join(str(t) for t in item.targets)
                print(f"{item.what}: {item.repo} {' '.join(item.sources)} -> {where}")
            return
        if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "") and not hub_reachable():
            # without this, each file would first retry its connection for tens of seconds
            os.environ["HF_HUB_OFFLINE"] = "1"  # read when huggingface_hub is imported, in fetch()
            print(f"no connection to {hub_endpoint()}: taking what the Hugging Face cache holds")
        placed = sum(fetch(item) for item in items)
    except (DownloadError, OutputPathError) as error:
        sys.exit(f"error: {error}")
    print(f"done: {placed} files placed in {weights}" if placed else f"done: {weights} already holds everything")


if __name__ == "__main__":
    main()
