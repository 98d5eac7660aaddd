"""Training options with musubi-tuner's meaning that sit around the loop: LoRAs merged into the base
before training, torch.compile and process-group settings, the timestep picture, Hugging Face uploads."""

from __future__ import annotations

import argparse
import datetime
import threading
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from kandinsky5.model.checkpoint import linear_shapes
from networks.lora_files import read_lora
from networks.lora_merge import merge_plan, weighted_loras


def base_weight_deltas(args: argparse.Namespace) -> dict | None:
    """--base_weights with their --base_weights_multiplier (default 1): the fp32 deltas load_dit adds."""
    if not args.base_weights:
        return None
    multipliers = list(args.base_weights_multiplier or [])
    if len(multipliers) > len(args.base_weights):
        raise ValueError(f"{len(multipliers)} --base_weights_multiplier values for {len(args.base_weights)} files")
    pairs = weighted_loras(args.base_weights, multipliers)
    for path, (_, multiplier) in zip(args.base_weights, pairs, strict=True):
        print(f"merging {path} into the DiT at strength {multiplier:g} before training")
    return merge_plan(pairs, linear_shapes(args.dit))


def network_size_of(path: str | None) -> tuple[int, float]:
    """--dim_from_weights: the rank and alpha of the LoRA file --network_weights names."""
    if not path:
        raise ValueError("--dim_from_weights takes the rank from --network_weights, which was not given")
    lora = read_lora(path)
    first = next(iter(lora.modules.values()))
    return first.rank, first.alpha


def compile_options(args: argparse.Namespace) -> dict | None:
    """torch.compile's arguments for each block, or None without --compile / --dynamo_backend."""
    dynamo = (args.dynamo_backend or "NO").upper() != "NO"
    if not (args.compile or dynamo):
        return None
    if args.compile_cache_size_limit:
        torch._dynamo.config.cache_size_limit = args.compile_cache_size_limit
    dynamic = {"true": True, "false": False, "auto": None, None: None}[args.compile_dynamic]
    return {
        "backend": args.dynamo_backend.lower() if dynamo else args.compile_backend,
        "mode": args.dynamo_mode or args.compile_mode,
        "dynamic": True if args.dynamo_dynamic else dynamic,
        "fullgraph": args.compile_fullgraph or args.dynamo_fullgraph,
    }


def training_kwargs_handlers(args: argparse.Namespace) -> list:
    from accelerate.utils import InitProcessGroupKwargs

    if args.cuda_allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.cuda_cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if args.ddp_timeout:
        return [InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.ddp_timeout))]
    return []


def show_timesteps(args: argparse.Namespace, draw, weights, latent_hw: tuple[int, int]) -> Path | None:
    """--show_timesteps: 100,000 draws of the configured sampling in 50 bins with the mean loss weight
    of each bin, as a PNG in --output_dir (image) or a text histogram (console)."""
    t = draw(100_000, latent_hw)
    w = weights(t)
    bins = 50
    index = (t * bins).long().clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins).float()
    mean_weight = torch.bincount(index, weights=w, minlength=bins) / counts.clamp(min=1)
    title = f"timestep_sampling {args.timestep_sampling}, weighting_scheme {args.weighting_scheme}"
    if args.show_timesteps == "console":
        print(title)
        for i in range(bins):
            bar = "#" * int(60 * counts[i] / counts.max())
            print(f"t {i / bins:.2f}-{(i + 1) / bins:.2f} weight {mean_weight[i]:7.3f} {bar}")
        return None
    from PIL import Image, ImageDraw

    width, height, bar_width = 1000, 400, 1000 // bins
    image = Image.new("RGB", (width, height + 40), "white")
    pen = ImageDraw.Draw(image)
    top = float(mean_weight.max()) or 1.0
    for i in range(bins):
        x = i * bar_width
        pen.rectangle(
            [x + 1, height - int(height * counts[i] / counts.max()), x + bar_width - 1, height], fill="#4878d0"
        )
        y = height - int(height * float(mean_weight[i]) / top)
        pen.ellipse([x + bar_width // 2 - 3, y - 3, x + bar_width // 2 + 3, y + 3], fill="#d65f5f")
    pen.text((10, height + 10), f"{title}  (bars: how often, dots: loss weight; t from 0 to 1)", fill="black")
    path = Path(args.output_dir) / "timesteps.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    print(f"wrote {path}")
    return path


class HubUpload:
    """Uploads saved files and states to --huggingface_repo_id; a failure is a warning (the files are on disk)."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.threads = args, []
        self.enabled = bool(args.huggingface_repo_id)
        self._repo_ready = False

    def _upload(self, path: Path) -> None:
        from huggingface_hub import HfApi

        args = self.args
        try:
            api = HfApi(token=args.huggingface_token)
            if not self._repo_ready:
                private = args.huggingface_repo_visibility != "public"
                api.create_repo(
                    args.huggingface_repo_id, repo_type=args.huggingface_repo_type, private=private, exist_ok=True
                )
                self._repo_ready = True
            target = "/".join(p for p in (args.huggingface_path_in_repo.strip("/"), path.name) if p)
            if path.is_dir():
                api.upload_folder(
                    repo_id=args.huggingface_repo_id,
                    folder_path=path,
                    path_in_repo=target,
                    repo_type=args.huggingface_repo_type,
                )
            else:
                api.upload_file(
                    repo_id=args.huggingface_repo_id,
                    path_or_fileobj=path,
                    path_in_repo=target,
                    repo_type=args.huggingface_repo_type,
                )
            tqdm.write(f"uploaded {path.name} to {args.huggingface_repo_id}")
        except Exception as error:  # any failure of the hub: the run goes on, the file is on disk
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            warnings.warn(
                f"could not upload {path} to {args.huggingface_repo_id} ({reason}); it is saved on disk", stacklevel=2
            )

    def __call__(self, path: Path, is_state: bool = False) -> None:
        if not self.enabled or (is_state and not self.args.save_state_to_huggingface):
            return
        if self.args.async_upload:
            thread = threading.Thread(target=self._upload, args=(Path(path),), daemon=False)
            thread.start()
            self.threads.append(thread)
        else:
            self._upload(Path(path))

    def wait(self) -> None:
        for thread in self.threads:
            thread.join()


def state_from_hub(args: argparse.Namespace) -> str:
    """--resume_from_huggingface: download the state named by --resume (<repo_id>/<path>[:revision[:type]])
    into the Hugging Face cache; returns its local folder."""
    from huggingface_hub import snapshot_download

    name, _, rest = args.resume.partition(":")
    revision, _, repo_type = rest.partition(":")
    owner, repo, *inside = name.split("/")
    path = "/".join(inside)
    local = snapshot_download(
        f"{owner}/{repo}",
        revision=revision or None,
        repo_type=repo_type or args.huggingface_repo_type or "model",
        allow_patterns=[f"{path}/*"] if path else None,
        token=args.huggingface_token,
    )
    return str(Path(local) / path)
