import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kandinsky5 import lora_tools
from kandinsky5.model.checkpoint import expected_shapes, load_dit
from kandinsky5.model.tasks import get_task
from networks.lora_files import read_lora
from networks.lora_merge import merge_lora, merge_plan

from .dit_helpers import diffusers_dit, random_inputs, run_diffusers
from .test_lora_inference import ALPHA, RANK, lora_weights, write_kohya

TASK = get_task("tiny-t2v")
SHAPES = {k[:-7]: s for k, s in expected_shapes(TASK.dit_params).items() if len(s) == 2}


@pytest.fixture
def kohya_file(tmp_path):
    path = tmp_path / "kohya.safetensors"
    write_kohya(path, {n: (d * 0.3, u * 0.3) for n, (d, u) in lora_weights().items()})
    return path


def deltas(path):
    """Each layer's change: the merged weight less a zero base (no DoRA here)."""
    return {name: fn(torch.zeros(SHAPES[name])) for name, fn in merge_plan([(read_lora(path), 1.0)], SHAPES).items()}


def test_the_exported_diffusers_lora_gives_diffusers_the_same_output_as_our_merge(tiny_tree, kohya_file, tmp_path):
    pytest.importorskip("peft")
    lora_tools.main(["to-diffusers", str(kohya_file), str(tmp_path / "peft.safetensors")])
    base = load_dit(tiny_tree / "model/tiny_t2v.safetensors", TASK, dtype=torch.float32)
    with_adapter = diffusers_dit("tiny-t2v", base.state_dict())
    with safe_open(str(tmp_path / "peft.safetensors"), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    with_adapter.load_lora_adapter(
        load_file(str(tmp_path / "peft.safetensors")), prefix="transformer", metadata=metadata
    )
    merge_lora(base, read_lora(kohya_file))  # our model with the kohya file merged
    merged = diffusers_dit("tiny-t2v", base.state_dict())
    inputs = random_inputs(base, 1, 2, 4, 6, 5)
    expected = run_diffusers(merged, *inputs, (1.0, 1.0, 1.0))
    got = run_diffusers(with_adapter, *inputs, (1.0, 1.0, 1.0))
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    with torch.no_grad():  # and our own model agrees up to diffusers' bf16 rounding of q and k after RoPE
        ours = base(*inputs)
    assert (ours - got).abs().max() <= 1e-3 * expected.abs().max()
    plain = run_diffusers(
        diffusers_dit(
            "tiny-t2v", load_dit(tiny_tree / "model/tiny_t2v.safetensors", TASK, dtype=torch.float32).state_dict()
        ),
        *inputs,
        (1.0, 1.0, 1.0),
    )
    assert (got - plain).abs().max() > 1e-2 * expected.abs().max()  # the adapter was really applied


def test_every_export_carries_the_same_update(kohya_file, tmp_path):
    lora_tools.main(["to-diffusers", str(kohya_file), str(tmp_path / "d.safetensors")])
    lora_tools.main(["to-official", str(kohya_file), str(tmp_path / "official")])
    lora_tools.main(["to-kohya", str(tmp_path / "d.safetensors"), str(tmp_path / "back.safetensors")])
    reference = deltas(kohya_file)
    for other in (tmp_path / "d.safetensors", tmp_path / "official", tmp_path / "back.safetensors"):
        got = deltas(other)
        assert got.keys() == reference.keys()
        assert all(torch.allclose(got[k], reference[k], atol=1e-6) for k in reference), other
    config = json.loads((tmp_path / "official" / "config_lora.json").read_text())
    assert config["r"] == config["lora_alpha"] == RANK
    assert "visual_transformer_blocks.0.self_attention.to_query" in config["target_modules"]
    assert (
        read_lora(tmp_path / "back.safetensors").modules["visual_transformer_blocks_0_self_attention_to_query"].alpha
        == RANK
    )  # alpha folded: scale 1
    assert ALPHA != RANK


@pytest.mark.parametrize("fp8", [False, True])
def test_merging_into_a_checkpoint_equals_merging_while_loading(tiny_tree, kohya_file, tmp_path, fp8):
    out = tmp_path / "merged.safetensors"
    lora_tools.main(
        [
            "merge",
            "--dit",
            str(tiny_tree / "model/tiny_t2v.safetensors"),
            "--lora",
            str(kohya_file),
            "--output",
            str(out),
            *(["--fp8"] if fp8 else []),
        ]
    )
    merged = load_dit(out, TASK, dtype=torch.bfloat16)
    reference = load_dit(
        tiny_tree / "model/tiny_t2v.safetensors",
        TASK,
        dtype=torch.bfloat16,
        fp8=fp8,
        deltas=merge_plan([(read_lora(kohya_file), 1.0)], SHAPES),
    )
    inputs = random_inputs(merged, 1, 2, 4, 6, 5)
    with torch.no_grad():
        assert torch.equal(merged(*inputs), reference(*inputs))


def test_a_lora_for_another_model_cannot_be_merged(tiny_tree, tmp_path):
    write_kohya(
        tmp_path / "other.safetensors",
        {"visual_transformer_blocks.9.self_attention.to_query": (torch.zeros(4, 64), torch.zeros(64, 4))},
    )
    with pytest.raises(SystemExit, match="match no layer of this model"):
        lora_tools.main(
            [
                "merge",
                "--dit",
                str(tiny_tree / "model/tiny_t2v.safetensors"),
                "--lora",
                str(tmp_path / "other.safetensors"),
                "--output",
                str(tmp_path / "m.safetensors"),
            ]
        )
    assert not (tmp_path / "m.safetensors").exists()
