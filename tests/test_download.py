"""The downloader, offline: a pre-filled Hugging Face cache and HF_HUB_OFFLINE=1 drive its real code path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .training_helpers import ROOT

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """A repository as huggingface_hub caches it: refs/main naming a snapshot that holds the files."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        path = folder / "snapshots" / COMMIT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def fill_cache(cache: Path) -> None:
    cache_repo(
        cache, "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s", {"model/kandinsky5lite_t2v_sft_5s.safetensors": b"dit"}
    )
    cache_repo(cache, "kandinskylab/Kandinsky-5.0-T2I-Lite", {"model/kandinsky5lite_t2i.safetensors": b"image dit"})
    vae = {"vae/config.json": b"{}", "vae/diffusion_pytorch_model.safetensors": b"vae", "transformer/x.bin": b"no"}
    cache_repo(cache, "hunyuanvideo-community/HunyuanVideo", vae)
    cache_repo(cache, "black-forest-labs/FLUX.1-dev", {**vae, "flux1-dev.safetensors": b"not wanted"})
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    qwen = {
        "config.json": b"{}",
        "tokenizer.json": b"{}",
        "preprocessor_config.json": b"{}",
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": b"1",
        "model-00002-of-00002.safetensors": b"2",
        "merges.txt": b"",
        "README.md": b"not wanted",
    }
    cache_repo(cache, "Qwen/Qwen2.5-VL-7B-Instruct", qwen)
    cache_repo(cache, "Comfy-Org/HunyuanVideo_repackaged", {"split_files/text_encoders/clip_l.safetensors": b"clip"})


def download(folder: Path, task: str, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "kandinsky5.download", "--task", task, str(folder)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder.parent, timeout=300)


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_files_land_where_docs_weights_md_says_and_a_second_run_downloads_nothing(tmp_path):
    cache = tmp_path / "hub"
    fill_cache(cache)
    weights = tmp_path / "weights"
    first = download(weights, "k5-lite-t2v-5s-sd", cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert listing(weights) == [
        "model/kandinsky5lite_t2v_sft_5s.safetensors",
        "text_encoder/config.json",
        "text_encoder/merges.txt",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/preprocessor_config.json",
        "text_encoder/tokenizer.json",
        "text_encoder2/clip_l.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert (weights / "model/kandinsky5lite_t2v_sft_5s.safetensors").read_bytes() == b"dit"
    docs = (ROOT / "docs" / "weights.md").read_text()
    for path in ("model/", "vae/", "text_encoder/", "text_encoder2/", "clip_l.safetensors"):
        assert path in docs

    # the image task adds its DiT and the FLUX VAE; the rest is present
    image = download(weights, "k5-lite-t2i-hd", cache)
    assert image.returncode == 0, image.stderr[-3000:]
    assert "Qwen2.5-VL-7B-Instruct: present" in image.stdout and "CLIP-L: present" in image.stdout
    assert {"flux/vae/config.json", "flux/vae/diffusion_pytorch_model.safetensors"} <= set(listing(weights))

    # a second run with an empty cache: nothing is asked of the hub, everything is present
    again = download(weights, "k5-lite-t2v-5s-sd", tmp_path / "empty_hub")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already holds everything" in again.stdout


def test_what_the_cache_lacks_offline_is_a_clear_error(tmp_path):
    result = download(tmp_path / "weights", "k5-pro-t2v-5s-sd", tmp_path / "empty_hub")
    assert result.returncode == 1
    assert "error: DiT from kandinskylab/Kandinsky-5.0-T2V-Pro-sft-5s: not in the Hugging Face cache" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_a_connection_it_says_so_at_once_and_takes_the_cache(tmp_path):
    """No HF_HUB_OFFLINE, and the hub unreachable (a closed local port as HF_ENDPOINT): one quick probe, then
    the cache alone, instead of each file retrying its connection for tens of seconds."""
    import time

    cache = tmp_path / "hf"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(cache), PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "kandinsky5.download", "--task", "k5-lite-t2v-5s-sd", str(tmp_path / "weights")]
    began = time.monotonic()
    empty = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert time.monotonic() - began < 20
    assert "no connection to http://127.0.0.1:9: taking what the Hugging Face cache holds" in empty.stdout
    assert empty.returncode == 1 and "not in the Hugging Face cache" in empty.stderr
    fill_cache(cache)
    filled = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert filled.returncode == 0, filled.stderr
    assert (tmp_path / "weights" / "model" / "kandinsky5lite_t2v_sft_5s.safetensors").read_bytes() == b"dit"


def test_the_help_names_what_task_chooses_here():
    help_text = subprocess.run(
        [sys.executable, "-m", "kandinsky5.download", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
    ).stdout
    assert "--dit" not in help_text and "its DiT, VAE and text encoders are fetched" in help_text


def test_a_truncated_file_in_the_weights_folder_is_fetched_again(tmp_path):
    """#34: a file cut short (an interrupted copy) was reported 'present' and kept."""
    cache = tmp_path / "hub"
    fill_cache(cache)
    weights = tmp_path / "weights"
    assert download(weights, "k5-lite-t2v-5s-sd", cache).returncode == 0
    dit = weights / "model/kandinsky5lite_t2v_sft_5s.safetensors"
    shard = weights / "text_encoder/model-00002-of-00002.safetensors"
    for path, cut in ((dit, b"di"), (shard, b"")):  # copies cut short (new files: the placed ones are hard links)
        path.unlink()
        path.write_bytes(cut)
    again = download(weights, "k5-lite-t2v-5s-sd", cache)
    assert again.returncode == 0, again.stderr[-3000:]
    repo_file = "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s's model/kandinsky5lite_t2v_sft_5s.safetensors"
    assert f"{dit} is 2 bytes, {repo_file} 3: fetching it again" in again.stdout
    assert dit.read_bytes() == b"dit" and shard.read_bytes() == b"2"


def test_path_problems_are_one_line_errors(tmp_path):
    """#34: a weights folder that is a file, and a file where one of its folders belongs, ended in tracebacks."""
    cache = tmp_path / "hub"
    fill_cache(cache)
    (tmp_path / "afile").write_text("x")
    as_file = download(tmp_path / "afile", "k5-lite-t2v-5s-sd", cache)
    assert as_file.returncode == 1 and "Traceback" not in as_file.stderr
    assert as_file.stderr.strip() == f"error: the weights folder {tmp_path / 'afile'} is a file, not a folder"
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model").write_text("not a folder")  # where the DiT's folder belongs
    blocked = download(weights, "k5-lite-t2v-5s-sd", cache)
    assert blocked.returncode == 1 and "Traceback" not in blocked.stderr
    assert blocked.stderr.strip().startswith(
        f"error: cannot place {weights / 'model' / 'kandinsky5lite_t2v_sft_5s.safetensors'}"
    )


def cache_blob_repo(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """As huggingface_hub really caches: each file a blob named by its hash (sha256 for large files, the git
    blob sha1 for small ones), linked from the snapshot."""
    import hashlib

    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        large = name.endswith(".safetensors")
        digest = hashlib.sha256(data) if large else hashlib.sha1(f"blob {len(data)}\0".encode() + data)
        blob = folder / "blobs" / digest.hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_a_same_size_file_with_other_bytes_is_fetched_again_and_a_checked_one_is_not_read_twice(tmp_path):
    """#34: sizes alone miss a corrupted copy; the cache names each blob by its hash."""
    cache = tmp_path / "hub"
    fill_cache(cache)
    repo = "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s"
    import shutil

    shutil.rmtree(cache / f"models--{repo.replace('/', '--')}")
    cache_blob_repo(cache, repo, {"model/kandinsky5lite_t2v_sft_5s.safetensors": b"dit weights"})
    weights = tmp_path / "weights"
    assert download(weights, "k5-lite-t2v-5s-sd", cache).returncode == 0
    dit = weights / "model/kandinsky5lite_t2v_sft_5s.safetensors"
    dit.unlink()
    dit.write_bytes(b"dit WEIGHTS")  # a copy (not the cache's hard link) of the same size, other bytes
    again = download(weights, "k5-lite-t2v-5s-sd", cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{dit} differs from {repo}'s model/kandinsky5lite_t2v_sft_5s.safetensors" in again.stdout
    assert dit.read_bytes() == b"dit weights"
    dit.unlink()
    dit.write_bytes(b"dit weights")  # a good copy: its hash is checked once and recorded
    assert "DiT: present" in download(weights, "k5-lite-t2v-5s-sd", cache).stdout
    record = json.loads((dit.parent / ".download_checks.json").read_text())
    assert record[dit.name].startswith(f"{len(b'dit weights')}:")
