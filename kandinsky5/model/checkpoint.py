"""Load DiT weights from the official single files or diffusers-format folders.

Accepted: a ``.safetensors`` file; a ``*.safetensors.index.json`` (sharded); a folder holding one
of those, or a diffusers model folder with a ``transformer/`` subfolder. A common key prefix
(``model.diffusion_model.``, ``diffusion_model.``, ``transformer.``, ``model.``, ``module.``) is
stripped. Tensors are read one at a time from the file (plain reads) straight into their final
dtype and device, into a model built on the ``meta`` device, so no full-size copy in another
dtype ever exists. A checkpoint of another architecture fails with the first differing key and
the tasks whose architecture the checkpoint does fit.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kandinsky5.model.dit import DiffusionTransformer3D, keeps_fp32
from kandinsky5.model.fp8_formats import COMFY_SCALED_MARKER, FP8FormatError, as_scale, fp8_layout, is_side_key
from kandinsky5.model.tasks import TASKS, TaskPreset
from modules.atomic_save import save_safetensors_atomic
from modules.fp8 import DEFAULT_BLOCK_SIZE, FP8Linear, check_scale, dequantize_weight, quantize_weight
from modules.memory import LOADING_MMAP_THRESHOLD, RUNNING_MMAP_THRESHOLD, release_freed_memory, set_mmap_threshold
from modules.safetensors_read import SafetensorsFile, SafetensorsFormatError

KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "module.")
FP8_SCALE_SUFFIX = ".scale_weight"
BLOCK_PREFIXES = ("text_transformer_blocks.", "visual_transformer_blocks.")


class CheckpointError(ValueError):
    pass


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors file(s) a DiT checkpoint path stands for."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"DiT checkpoint {path} does not exist")
    if path.is_dir():
        if (path / "transformer").is_dir() and not any(path.glob("*.safetensors")):
            path = path / "transformer"
        indexes = sorted(path.glob("*.safetensors.index.json"))
        singles = sorted(path.glob("*.safetensors"))
        if indexes:
            path = indexes[0]
        elif len(singles) == 1:
            return singles
        else:
            found = ", ".join(p.name for p in singles) or "none"
            raise CheckpointError(
                f"folder {path} should hold one .safetensors file or a *.safetensors.index.json; found {found}"
            )
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{path} is not a safetensors index (expected a 'weight_map'): {error}") from None
        shards = [path.parent / name for name in sorted(set(weight_map.values()))]
        missing = [str(s) for s in shards if not s.exists()]
        if missing:
            raise CheckpointError(f"{path} lists shard(s) that do not exist: {', '.join(missing)}")
        return shards
    if path.suffix != ".safetensors":
        raise CheckpointError(f"DiT checkpoint {path} is not a .safetensors file (or a folder / index of them)")
    return [path]


def _common_prefix(keys: list[str]) -> str:
    for prefix in KEY_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def read_layout(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Model key -> (file, key in that file, shape), without reading any tensor data."""
    raw: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        try:
            with SafetensorsFile(file) as f:
                for key in f.keys():
                    raw[key] = (file, f.shape(key))
        except (OSError, SafetensorsFormatError) as error:
            raise CheckpointError(f"cannot read {file} as safetensors: {error}") from None
    # (ComfyUI's scaled_fp8 marker may sit outside the prefix its weights share)
    prefix = _common_prefix([key for key in raw if key.rpartition(".")[2] != COMFY_SCALED_MARKER])
    return {key.removeprefix(prefix): (file, key, shape) for key, (file, shape) in raw.items()}


def read_fp8_layout(files: list[Path], layout: Mapping[str, tuple[Path, str, tuple[int, ...]]], source: str):
    """The checkpoint's fp8 format (kandinsky5/model/fp8_formats.py), from its markers."""
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(SafetensorsFile(f)) for f in files}
        metadata = handles[files[0]].metadata()

        def read(key: str) -> torch.Tensor:
            file, file_key, _ = layout[key]
            return handles[file].get_tensor(file_key)

        try:
            return fp8_layout(list(layout), metadata, source, read)
        except FP8FormatError as error:
            raise CheckpointError(str(error)) from None


def linear_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Module name -> (out, in) of every 2-D weight of a DiT checkpoint, read from its header alone."""
    layout = read_layout(checkpoint_files(path))
    return {
        k.removesuffix(".weight"): shape
        for k, (_, _, shape) in layout.items()
        if k.endswith(".weight") and len(shape) == 2
    }


@cache
def _expected_shapes(params_items: tuple) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = DiffusionTransformer3D(**dict(params_items))
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


def expected_shapes(dit_params: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return _expected_shapes(tuple(sorted(dit_params.items())))


def matching_tasks(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Tasks whose DiT has exactly these keys and shapes."""
    return [name for name, task in TASKS.items() if expected_shapes(task.dit_params) == dict(shapes)]


def check_architecture(layout: Mapping[str, tuple[Path, str, tuple[int, ...]]], task: TaskPreset, source: str) -> None:
    """The checkpoint's keys and shapes (fp8 scales and markers aside) must be exactly the task's DiT."""
    expected = expected_shapes(task.dit_params)
    found = {key: shape for key, (_, _, shape) in layout.items() if not is_side_key(key)}
    if found == expected:
        return
    problems = [
        f"key {k!r} has shape {list(found[k])} in the checkpoint, the task expects {list(shape)}"
        for k, shape in expected.items()
        if k in found and found[k] != shape
    ]
    problems += [f"key {k!r} is missing" for k in expected if k not in found]
    problems += [f"unexpected key {k!r}" for k in found if k not in expected]
    fits = [name for name in matching_tasks(found) if not name.startswith("tiny-") or task.name.startswith("tiny-")]
    hint = f" The checkpoint fits these tasks: {', '.join(fits)}." if fits else " No known task has this architecture."
    more = f" ({len(problems) - 1} more differences)" if len(problems) > 1 else ""
    raise CheckpointError(f"{source} does not fit task {task.name!r}: {problems[0]}{more}.{hint}")


def set_parameter(model: nn.Module, key: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """Parameter ``key`` set to ``tensor`` in its final dtype (fp32 for the parts kept in fp32); a
    parameter that already has memory of its own (a packed projection) is filled in place."""
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path)
    current = module._parameters[name]
    if not current.is_meta:
        current.data.copy_(tensor)
        return
    module._parameters[name] = nn.Parameter(_materialize(tensor, key, dtype), requires_grad=False)


def _materialize(tensor: torch.Tensor, key: str, dtype: torch.dtype) -> torch.Tensor:
    """The tensor in its final dtype, in memory of its own. safetensors can hand out CPU tensors that are
    not 64-byte aligned, which sends matmuls down other (slower, differently rounding) kernel paths."""
    target = torch.float32 if keeps_fp32(key) else dtype
    if tensor.dtype != target:
        return tensor.to(target)
    return tensor.clone() if tensor.device.type == "cpu" else tensor


def is_fp8_target(key: str) -> bool:
    """Weights that fp8 stores: every Linear weight inside the text and visual blocks (q/k norms aside)."""
    return key.startswith(BLOCK_PREFIXES) and key.endswith(".weight") and "norm" not in key


def load_dit(
    path: str | Path,
    task: TaskPreset,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    fp8_block_size: int = DEFAULT_BLOCK_SIZE,
    deltas: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> DiffusionTransformer3D:
    """Build the task's DiT and fill it from ``path``, one tensor at a time; parameters are frozen.

    ``fp8``: the block Linear weights are quantized to block-scaled float8 as they are read (an fp8
    checkpoint, with ``.scale_weight`` keys, is always loaded as fp8, without re-quantizing).
    ``deltas``: module name -> a function merging LoRAs into the fp32 weight, applied before any quantization."""
    files = checkpoint_files(path)
    layout = read_layout(files)
    check_architecture(layout, task, str(path))
    fp8_format = read_fp8_layout(files, layout, str(path))
    with torch.device("meta"):
        model = DiffusionTransformer3D(**task.dit_params)
    device, deltas = torch.device(device), dict(deltas or {})
    scales = {module: (*layout[key][:2], fp8_format.format) for module, key in fp8_format.scales.items()}
    side_keys = set(fp8_format.scales.values()) | fp8_format.ignored
    if fp8 or scales:
        set_mmap_threshold(LOADING_MMAP_THRESHOLD)
    else:  # (fp8 layers are not packed)
        model.allocate_packed_projections(dtype, device)
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with contextlib.ExitStack() as stack:
        # read tensor by tensor, not memory-mapped: a mapping of a file larger than the memory can fail
        handles = {f: stack.enter_context(SafetensorsFile(f, device)) for f in files}
        for key, (file, file_key, _) in layout.items():
            if key in side_keys:
                continue
            tensor = _loaded(handles, key, file, file_key, scales, deltas, device)
            module_name = key.rpartition(".")[0]
            if isinstance(tensor, tuple):
                quantized[module_name] = tensor
            elif (fp8 or module_name in scales) and is_fp8_target(key):
                quantized[module_name] = quantize_weight(tensor, fp8_block_size)
            else:
                set_parameter(model, key, tensor, dtype)
    for module_name, (weight, scale) in quantized.items():
        parent, _, child = module_name.rpartition(".")
        bias = model.get_submodule(module_name).bias
        fp8_layer = FP8Linear(weight, scale, None if bias is None else bias.detach())
        setattr(model.get_submodule(parent), child, fp8_layer)
    if quantized:
        release_freed_memory()
        set_mmap_threshold(RUNNING_MMAP_THRESHOLD)
    return model


def _loaded(handles, key, file, file_key, scales, deltas, device):
    """A checkpoint tensor with its LoRA delta added (fp32); an fp8 weight left alone stays (weight, scale)."""
    tensor = handles[file].get_tensor(file_key)
    module_name = key.rpartition(".")[0]
    if module_name in scales and key.endswith(".weight"):
        scale_file, scale_key, fmt = scales[module_name]
        scale = check_scale(handles[scale_file].get_tensor(scale_key).float(), scale_key, str(scale_file))
        try:
            scale = as_scale(scale, fmt)
        except FP8FormatError as error:
            raise CheckpointError(f"{scale_file}: {scale_key}: {error}") from None
        if module_name not in deltas:
            return tensor, scale
        tensor = dequantize_weight(tensor, scale, torch.float32)
    if key.endswith(".weight") and module_name in deltas:
        tensor = deltas.pop(module_name)(tensor.float().to(device))
    return tensor


def save_dit(model: DiffusionTransformer3D, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write the DiT's state dict as one safetensors file with the official key names."""
    meta = {"dit_params": json.dumps(model.config)}
    meta.update(metadata or {})
    # packed projections share one buffer (kandinsky5/model/packed_projections.py); safetensors wants each alone
    state = {k: t if t.untyped_storage().nbytes() == t.nbytes else t.clone() for k, t in model.state_dict().items()}
    save_safetensors_atomic(state, path, metadata=meta)
