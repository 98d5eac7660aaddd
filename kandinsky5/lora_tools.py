"""LoRA conversions and merging.

    python -m kandinsky5.lora_tools to-diffusers LORA OUT.safetensors    PEFT keys (transformer.<path>.lora_A/B.weight)
    python -m kandinsky5.lora_tools to-official LORA OUT_FOLDER          lora.safetensors + config_lora.json
    python -m kandinsky5.lora_tools to-kohya LORA OUT.safetensors        lora_unet_<path>.lora_down/up.weight + alpha
    python -m kandinsky5.lora_tools merge --dit DIT --lora A [B ...] [--multiplier 1.0 ...] --output OUT [--fp8]
    python -m kandinsky5.lora_tools ema FILE FILE [...] --output OUT [--beta 0.95 [--beta2 B] | --sigma_rel S]

LORA may be in any layout the toolkit reads (kohya, PEFT/diffusers, official). The diffusers and
official exports fold alpha / rank into the up matrix and record alpha = rank, so every program
applies the intended scale whether or not it reads alpha: ComfyUI, diffusers and the official
code all load the diffusers file unchanged. ``merge`` adds LoRAs to a DiT checkpoint (in fp32,
streamed one tensor at a time) and writes it in its own dtype or, with --fp8, in fp8. ``ema``
averages the files one run saved along the way (networks/post_hoc_ema.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from kandinsky5.model.checkpoint import checkpoint_files, linear_shapes, read_layout
from kandinsky5.model.fp8_checkpoint import rewrite_checkpoint
from modules.atomic_save import save_safetensors_atomic
from modules.option_types import FINITE, ScriptParser, number
from networks.lora_files import LoRAFile, read_lora
from networks.lora_merge import merge_plan, weighted_loras
from networks.post_hoc_ema import post_hoc_ema, training_order

KOHYA_PREFIX = "lora_unet_"


def dotted_names(lora: LoRAFile, dit: str | Path | None) -> dict[str, str]:
    """LoRA module name -> dotted module path. Kohya names are resolved against a DiT's real module
    names when a checkpoint is given, else against the known Kandinsky 5 module names."""
    if not lora.underscored_names:
        return {name: name for name in lora.modules}
    if dit is not None:
        names = [key[: -len(".weight")] for key in read_layout(checkpoint_files(dit)) if key.endswith(".weight")]
    else:
        names = [_dotted_guess(name) for name in lora.modules]
    lookup = {name.replace(".", "_"): name for name in names}
    missing = [n for n in lora.modules if n not in lookup]
    if missing:
        raise ValueError(f"LoRA {lora.path}: cannot resolve {missing[0]!r} to a module of the DiT")
    return {name: lookup[name] for name in lora.modules}


def _dotted_guess(name: str) -> str:
    """text_transformer_blocks_0_self_attention_to_query -> text_transformer_blocks.0.self_attention.to_query"""
    for group in ("text_transformer_blocks", "visual_transformer_blocks"):
        if name.startswith(group + "_"):
            index, rest = name[len(group) + 1 :].split("_", 1)
            for module in ("self_attention", "cross_attention", "feed_forward", "text_modulation", "visual_modulation"):
                if rest.startswith(module + "_"):
                    return f"{group}.{index}.{module}.{rest[len(module) + 1 :]}"
    raise ValueError(f"cannot tell the module path of LoRA module {name!r}; pass --dit to resolve it")


def plain_lora(lora: LoRAFile, layout: str) -> None:
    """LoHa and LoKr modules have no lora_A/lora_B form, and PEFT's DoRA magnitude is per output row where
    LyCORIS's (and ComfyUI's) is per input column: named, not converted."""
    other = sorted({w.kind for w in lora.modules.values() if w.kind != "LoRA"})
    if other:
        raise ValueError(
            f"LoRA {lora.path} holds {' and '.join(other)} modules, which the {layout} layout cannot hold (it has "
            "LoRA's two matrices only). ComfyUI and musubi-tuner read the file as it is; generation here merges it"
        )
    if any(w.dora_scale is not None for w in lora.modules.values()):
        raise ValueError(
            f"LoRA {lora.path} is DoRA (dora_scale, a magnitude per input column as LyCORIS trains it); the {layout} "
            "layout's DoRA keeps one per output row, which cannot express it. ComfyUI reads the file as it is; "
            "generation here merges it"
        )


def _single_rank(lora: LoRAFile) -> int:
    ranks = {w.rank for w in lora.modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA {lora.path} mixes ranks {sorted(ranks)}; the PEFT layouts need one rank")
    return ranks.pop()


def to_diffusers(lora: LoRAFile, output: Path, dit=None) -> None:
    plain_lora(lora, "diffusers/PEFT")
    rank, names = _single_rank(lora), dotted_names(lora, dit)
    tensors = {}
    for name, weights in lora.modules.items():
        path = names[name]
        tensors[f"transformer.{path}.lora_A.weight"] = weights.down.float()
        tensors[f"transformer.{path}.lora_B.weight"] = weights.up.float() * weights.scale
    targets = sorted(names[n] for n in lora.modules)  # full paths: PEFT matches suffixes, leaves would match more
    adapter = {"transformer.r": rank, "transformer.lora_alpha": rank, "transformer.target_modules": targets}
    save_safetensors_atomic(tensors, output, metadata={"lora_adapter_metadata": json.dumps(adapter), "format": "pt"})


def to_official(lora: LoRAFile, output: Path, dit=None) -> None:
    plain_lora(lora, "official")
    rank, names = _single_rank(lora), dotted_names(lora, dit)
    tensors = {}
    for name, weights in lora.modules.items():
        tensors[f"{names[name]}.lora_A.weight"] = weights.down.float()
        tensors[f"{names[name]}.lora_B.weight"] = weights.up.float() * weights.scale
    output.mkdir(parents=True, exist_ok=True)
    trigger = lora.metadata.get("trigger")
    save_safetensors_atomic(tensors, output / "lora.safetensors", metadata={"trigger": trigger} if trigger else None)
    targets = sorted(names[n] for n in lora.modules)  # full paths: PEFT matches suffixes, leaves would match more
    config = {"r": rank, "lora_alpha": rank, "target_modules": targets, "lora_dropout": 0.0, "bias": "none"}
    (output / "config_lora.json").write_text(json.dumps(config, indent=2))


def to_kohya(lora: LoRAFile, output: Path, dit=None) -> None:
    """Every module under ``lora_unet_`` names; LoHa, LoKr and DoRA modules keep their LyCORIS parts."""
    names = dotted_names(lora, dit)
    tensors = {}
    for name, weights in lora.modules.items():
        key = KOHYA_PREFIX + names[name].replace(".", "_")
        tensors |= {f"{key}.{part}": t.float() for part, t in weights.parts().items()}
        if weights.alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(weights.alpha))
    save_safetensors_atomic(tensors, output, metadata={k: v for k, v in lora.metadata.items() if k.startswith("ss_")})


def merge(dit: Path, loras: list[Path], multipliers: list[float], output: Path, fp8: bool) -> int:
    deltas = merge_plan(weighted_loras(loras, multipliers), linear_shapes(dit))
    return rewrite_checkpoint(dit, output, fp8=fp8, deltas=deltas)


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("to-diffusers", "PEFT/diffusers keys, alpha folded in (ComfyUI, diffusers, official)"),
        ("to-official", "the official folder layout: lora.safetensors + config_lora.json"),
        ("to-kohya", "kohya / musubi-tuner keys with alpha"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("lora", help="LoRA file or official LoRA folder (any layout)")
        command.add_argument("output", help="file (or folder for to-official) to write")
        command.add_argument("--dit", help="a DiT checkpoint to resolve kohya module names against (optional)")
    merging = commands.add_parser("merge", help="merge LoRAs into a DiT checkpoint")
    merging.add_argument("--dit", required=True, help="DiT checkpoint (.safetensors, folder or index.json)")
    merging.add_argument("--lora", nargs="+", required=True, help="LoRA files or folders")
    merging.add_argument("--multiplier", nargs="*", type=FINITE, default=[], help="one per LoRA (default 1.0)")
    merging.add_argument("--output", required=True, help="the merged .safetensors file")
    merging.add_argument("--fp8", action="store_true", help="write the merged DiT in fp8 (as _make_fp8_ckpt.py)")
    averaging = commands.add_parser("ema", help="post-hoc EMA: average the files one run saved (by step or epoch)")
    averaging.add_argument("files", nargs="+", help="two or more files of one run, taken in training order")
    averaging.add_argument("--output", required=True, help="the averaged .safetensors file")
    averaging.add_argument(
        "--beta", type=number(0, 1), default=0.95, help="decay per file, 0 to 1 (default 0.95: more weight to the past)"
    )
    averaging.add_argument("--beta2", type=number(0, 1), help="the last file's decay: beta moves linearly to it")
    averaging.add_argument(
        "--sigma_rel",
        type=number(0, 0.5, low_open=True, high_open=True),
        help="power-function EMA of relative width sigma_rel (0.05 to 0.3 usual) instead of --beta",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "ema":
            if args.sigma_rel is not None and args.beta2 is not None:
                raise ValueError("--sigma_rel replaces --beta and --beta2; give one method")
            files = training_order([Path(f) for f in args.files])
            tensors, metadata = post_hoc_ema(files, args.beta, args.beta2, args.sigma_rel)
            save_safetensors_atomic(tensors, Path(args.output), metadata=metadata)
            print(f"wrote {args.output}: {metadata['ss_post_hoc_ema']} ({', '.join(f.name for f in files)})")
            return
        if args.command == "merge":
            count = merge(Path(args.dit), args.lora, args.multiplier, Path(args.output), args.fp8)
            print(f"wrote {args.output} ({count} weights changed)")
            return
        convert = {"to-diffusers": to_diffusers, "to-official": to_official, "to-kohya": to_kohya}[args.command]
        convert(read_lora(args.lora), Path(args.output), args.dit)
        print(f"wrote {args.output}")
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
