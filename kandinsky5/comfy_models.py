"""``--comfy_models_dir``: take the weights from a ComfyUI ``models/`` folder, by their usual names.

For the task it fills each of --dit, --vae, --text_encoder_qwen and --text_encoder_clip that was
not given:

    --dit                diffusion_models/<the task's checkpoint>.safetensors (also in a subfolder,
                         or a variant of that name such as ..._fp8.safetensors)
    --vae                vae/hunyuan_video_vae_bf16.safetensors (video tasks) or vae/ae.safetensors (image tasks)
    --text_encoder_qwen  text_encoders/qwen_2.5_vl_7b.safetensors, else ..._fp8_scaled.safetensors
                         (the fp8 one first with --text_encoder_dtype fp8)
    --text_encoder_clip  text_encoders/clip_l.safetensors

(``clip/``, ComfyUI's older name for ``text_encoders/``, is searched too.) It prints which file it
picked for each, and which it could not find.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kandinsky5.model.tasks import TaskPreset
from modules.safetensors_read import SafetensorsFile, SafetensorsFormatError

TEXT_FOLDERS = ("text_encoders", "clip")
VAE_NAMES = {
    "hunyuan": (
        "hunyuan_video_vae_bf16.safetensors",
        "hunyuan_video_vae_fp32.safetensors",
        "hunyuan_video_vae*.safetensors",
    ),
    "flux": ("ae.safetensors", "flux_vae.safetensors", "flux*vae*.safetensors"),
}
QWEN_NAMES = ("qwen_2.5_vl_7b.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_2.5_vl_7b*.safetensors")
CLIP_NAMES = ("clip_l.safetensors", "clip_l*.safetensors")


class ComfyFolderError(ValueError):
    pass


def add_comfy_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--comfy_models_dir",
        help="a ComfyUI models/ folder: fills --dit, --vae, --text_encoder_qwen and --text_encoder_clip (those not "
        "given) from diffusion_models/, vae/ and text_encoders/ by their usual file names",
    )


def not_a_dit(path: Path) -> str | None:
    """What the file is when it is not a DiT checkpoint (read from its header), else None."""
    try:
        with SafetensorsFile(path) as f:
            keys = list(f.keys())
    except (OSError, SafetensorsFormatError):
        return "not a readable safetensors file"
    if any("lora" in key for key in keys):
        return "a LoRA"
    if not any("visual_transformer_blocks." in key for key in keys):
        return "not a Kandinsky 5 DiT (no visual_transformer_blocks)"
    return None


def _first(folders: list[Path], names: tuple[str, ...], passed: list[str], reject=None) -> Path | None:
    """The first file matching ``names`` in order (exact names before patterns), in the folders or below them,
    that ``reject`` (path -> reason or None) accepts; those it passes over go to ``passed``."""
    for name in names:
        for folder in folders:
            for found in sorted(folder.glob(name)) or sorted(folder.rglob(name)):
                why = reject(found) if reject else None
                if why is None:
                    return found
                if f"{found} ({why})" not in passed:
                    passed.append(f"{found} ({why})")
    return None


def candidates(root: Path, task: TaskPreset, text_encoder_dtype: str = "bfloat16") -> dict[str, tuple[list, tuple]]:
    """For each option: the folders searched and the names tried, in order."""
    stem = task.checkpoint.removesuffix(".safetensors")
    text = [root / name for name in TEXT_FOLDERS]
    qwen = QWEN_NAMES if text_encoder_dtype != "fp8" else (QWEN_NAMES[1], QWEN_NAMES[0], QWEN_NAMES[2])
    return {
        "dit": ([root / "diffusion_models", root / "unet"], (task.checkpoint, f"{stem}*.safetensors")),
        "vae": ([root / "vae"], VAE_NAMES[task.vae]),
        "text_encoder_qwen": (text, qwen),
        "text_encoder_clip": (text, CLIP_NAMES),
    }


def fill_from_comfy(args: argparse.Namespace, task: TaskPreset, options: tuple[str, ...]) -> None:
    """Set each of ``options`` still None from ``args.comfy_models_dir``; print what was picked and missed."""
    if not getattr(args, "comfy_models_dir", None):
        return
    root = Path(args.comfy_models_dir)
    if not root.is_dir():
        raise ComfyFolderError(f"--comfy_models_dir {root} is not a folder (expected ComfyUI's models/ folder)")
    wanted = candidates(root, task, getattr(args, "text_encoder_dtype", "bfloat16") or "bfloat16")
    for option in options:
        if getattr(args, option, None) is not None:
            continue
        folders, names = wanted[option]
        passed: list[str] = []
        found = _first([f for f in folders if f.is_dir()], names, passed, not_a_dit if option == "dit" else None)
        for what in passed:
            print(f"--comfy_models_dir: passed over {what} for --{option}")
        if found is None:
            where = " or ".join(str(f.relative_to(root)) + "/" for f in folders)
            print(f"--comfy_models_dir: no {' / '.join(names)} in {root}/{where}; give --{option}")
            continue
        print(f"--comfy_models_dir: --{option} {found}")
        setattr(args, option, str(found))
