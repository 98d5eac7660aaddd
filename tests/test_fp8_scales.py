"""fp8 scales are checked when a file is read (#34): a scale of 0, NaN or infinity in a DiT fp8 checkpoint or
an fp8-scaled Qwen file is named with its file, not loaded to generate noise without a word."""

from __future__ import annotations

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import _make_fp8_ckpt
from kandinsky5.encoders.text_encoders import QwenEncoder
from kandinsky5.model.checkpoint import load_dit
from kandinsky5.model.tasks import get_task
from kandinsky5.tiny import write_qwen_single_file
from modules.fp8 import FP8ScaleError


def with_one_scale(path, value: float) -> str:
    """Rewrite ``path`` with the first scale tensor's first value set to ``value``; returns that key."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if k.endswith((".scale_weight", ".weight_scale")))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, str(path), metadata=metadata)
    return key


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf")])
def test_a_bad_scale_in_an_fp8_dit_checkpoint_is_named(tiny_tree, tmp_path, value):
    path = tmp_path / "fp8.safetensors"
    _make_fp8_ckpt.main(["--input", str(tiny_tree / "model/tiny_t2v.safetensors"), "--output", str(path)])
    load_dit(path, get_task("tiny-t2v"))  # loads as written
    key = with_one_scale(path, value)
    with pytest.raises(FP8ScaleError, match=rf"{path}: the fp8 scale {key} holds 1 value\(s\) that are not finite"):
        load_dit(path, get_task("tiny-t2v"))


@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_a_bad_scale_in_an_fp8_scaled_qwen_file_is_named(tmp_path, value):
    path = tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    write_qwen_single_file(path, 3, fp8_scaled=True)
    QwenEncoder(path)  # loads as written
    key = with_one_scale(path, value)
    with pytest.raises(FP8ScaleError, match=rf"the fp8 scale {key} holds 1 value"):
        QwenEncoder(path)
