import pytest
import torch
from safetensors.torch import load_file

import _make_fp8_ckpt
from kandinsky5.model.checkpoint import CheckpointError, expected_shapes, is_fp8_target, load_dit
from kandinsky5.model.tasks import get_task
from modules.fp8 import FP8Linear, quantize_linears
from networks.lora_files import read_lora
from networks.lora_merge import merge_lora, merge_plan

from .dit_helpers import random_inputs
from .generation_helpers import sampled_latent
from .test_lora_inference import lora_weights, write_kohya

TASK = get_task("tiny-t2v")


def forward(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_fp8_targets_are_the_block_linears(tiny_tree):
    model = load_dit(tiny_tree / "model/tiny_t2v.safetensors", TASK, dtype=torch.float32, fp8=True)
    fp8 = {name for name, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert len(fp8) == 2 * 7 + 3 * 11  # per text block: modulation, q, k, v, out, ff in/out; visual: + cross
    assert all(name.startswith(("text_transformer_blocks", "visual_transformer_blocks")) for name in fp8)
    assert not is_fp8_target("visual_transformer_blocks.0.self_attention.query_norm.weight")
    assert not is_fp8_target("out_layer.out_layer.weight") and not is_fp8_target("visual_embeddings.in_layer.weight")


def test_fp8_output_stays_close_to_full_precision(tiny_tree):
    full = load_dit(tiny_tree / "model/tiny_t2v.safetensors", TASK, dtype=torch.float32)
    fp8 = load_dit(tiny_tree / "model/tiny_t2v.safetensors", TASK, dtype=torch.float32, fp8=True)
    inputs = random_inputs(full, 1, 2, 4, 6, 5)
    reference, out = forward(full, inputs), forward(fp8, inputs)
    assert (out - reference).norm() / reference.norm() < 0.05  # measured: 1.7 %
    bf16 = load_dit(tiny_tree / "model/tiny_t2v.safetensors", TASK, dtype=torch.bfloat16, fp8=True)
    assert (forward(bf16, inputs).float() - reference).norm() / reference.norm() < 0.06


def test_quantize_on_load_equals_the_converted_checkpoint(tiny_tree, tmp_path):
    _make_fp8_ckpt.main(
        ["--input", str(tiny_tree / "model/tiny_t2v.safetensors"), "--output", str(tmp_path / "f.safetensors")]
    )
    stored = load_file(str(tmp_path / "f.safetensors"))
    assert sum(t.dtype == torch.float8_e4m3fn for t in stored.values()) == 47
    assert stored["visual_transformer_blocks.0.feed_forward.in_layer.scale_weight"].shape == (128, 1, 1)
    on_load = load_dit(tiny_tree / "model/tiny_t2v.safetensors", TASK, dtype=torch.float32, fp8=True)
    inputs = random_inputs(on_load, 1, 2, 4, 6, 5)
    for fp8_flag in (False, True):  # an fp8 checkpoint is fp8 with or without --fp8_base
        converted = load_dit(tmp_path / "f.safetensors", TASK, dtype=torch.float32, fp8=fp8_flag)
        assert torch.equal(forward(converted, inputs), forward(on_load, inputs))
    with pytest.raises(SystemExit, match="is already an fp8 checkpoint"):
        _make_fp8_ckpt.main(["--input", str(tmp_path / "f.safetensors"), "--output", str(tmp_path / "g.safetensors")])


def test_lora_merged_under_fp8_equals_merging_before_quantizing(tiny_tree, tmp_path):
    write_kohya(tmp_path / "l.safetensors", {n: (d * 0.3, u * 0.3) for n, (d, u) in lora_weights().items()})
    lora = read_lora(tmp_path / "l.safetensors")
    shapes = {k[:-7]: s for k, s in expected_shapes(TASK.dit_params).items() if len(s) == 2}
    merged_on_load = load_dit(
        tiny_tree / "model/tiny_t2v.safetensors",
        TASK,
        dtype=torch.float32,
        fp8=True,
        deltas=merge_plan([(lora, 1.0)], shapes),
    )
    reference = load_dit(tiny_tree / "model/tiny_t2v.safetensors", TASK, dtype=torch.float32)
    merge_lora(reference, lora)
    quantize_linears(reference, lambda name: is_fp8_target(name + ".weight"))
    inputs = random_inputs(reference, 1, 2, 4, 6, 5)
    assert torch.equal(forward(merged_on_load, inputs), forward(reference, inputs))


def test_generation_and_training_with_fp8(tiny_tree, tmp_path):

    full, fp8 = sampled_latent(tiny_tree, tmp_path, "full"), sampled_latent(tiny_tree, tmp_path, "fp8", "--fp8_base")
    assert not torch.equal(full, fp8) and (fp8 - full).norm() / full.norm() < 0.1


def test_fp8_checkpoint_errors(tiny_tree, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dit(tmp_path / "none.safetensors", TASK, fp8=True)
    with pytest.raises(SystemExit, match="does not exist"):
        _make_fp8_ckpt.main(
            ["--input", str(tmp_path / "none.safetensors"), "--output", str(tmp_path / "o.safetensors")]
        )
    assert not (tmp_path / "o.safetensors").exists()
