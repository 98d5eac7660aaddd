import json

import pytest
import torch
from safetensors.torch import save_file

from kandinsky5.model.checkpoint import (
    CheckpointError,
    check_architecture,
    expected_shapes,
    load_dit,
    matching_tasks,
    save_dit,
)
from kandinsky5.model.dit import keeps_fp32
from kandinsky5.model.tasks import get_task

from .dit_helpers import diffusers_dit, random_dit, random_inputs, run_diffusers


def forward(model, seed=1):
    with torch.no_grad():
        return model(*random_inputs(model, 1, 2, 4, 6, 5, seed=seed))


def test_single_file_round_trip_in_fp32(tmp_path):
    model = random_dit("tiny-t2v")
    save_dit(model, tmp_path / "dit.safetensors")
    loaded = load_dit(tmp_path / "dit.safetensors", get_task("tiny-t2v"), dtype=torch.float32)
    assert torch.equal(forward(model), forward(loaded))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_loading_in_bf16_casts_tensor_by_tensor_and_keeps_fp32_parts(tmp_path):
    save_dit(random_dit("tiny-t2v"), tmp_path / "dit.safetensors")
    loaded = load_dit(tmp_path / "dit.safetensors", get_task("tiny-t2v"), dtype=torch.bfloat16)
    for name, param in loaded.named_parameters():
        assert param.dtype == (torch.float32 if keeps_fp32(name) else torch.bfloat16), name
        assert param.device.type == "cpu"
    assert forward(loaded).dtype == torch.bfloat16


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", "transformer.", "model."])
def test_key_prefixes_are_stripped(tmp_path, prefix):
    model = random_dit("tiny-t2i")
    save_file({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "dit.safetensors")
    loaded = load_dit(tmp_path / "dit.safetensors", get_task("tiny-t2i"), dtype=torch.float32)
    assert torch.equal(forward(model), forward(loaded))


def test_state_dict_round_trips_through_diffusers_and_a_sharded_diffusers_folder(tmp_path):
    ours = random_dit("tiny-t2v")
    theirs = diffusers_dit("tiny-t2v", ours.state_dict())  # strict load: the keys are the same
    assert set(theirs.state_dict()) == set(ours.state_dict())
    theirs.save_pretrained(tmp_path / "repo" / "transformer", max_shard_size="200KB")
    folder = tmp_path / "repo" / "transformer"
    assert len(list(folder.glob("*.safetensors"))) > 1 and list(folder.glob("*.index.json"))
    task = get_task("tiny-t2v")
    for path in (folder, tmp_path / "repo", next(folder.glob("*.index.json"))):
        loaded = load_dit(path, task, dtype=torch.float32)
        inputs = random_inputs(loaded, 1, 2, 4, 6, 5)
        with torch.no_grad():
            out = loaded(*inputs)
        expected = run_diffusers(theirs, *inputs, (1.0, 1.0, 1.0))
        assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
        assert torch.equal(out, forward_with(ours, inputs))


def forward_with(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_wrong_architecture_names_the_key_and_the_fitting_tasks(tmp_path):
    save_dit(random_dit("tiny-pro-t2v"), tmp_path / "pro.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_dit(tmp_path / "pro.safetensors", get_task("tiny-t2v"))
    message = str(error.value)
    assert "does not fit task 'tiny-t2v'" in message
    assert "has shape [" in message or "is missing" in message or "unexpected key" in message
    assert "fits these tasks: tiny-pro-t2v" in message


def test_official_architecture_mismatch_names_the_official_tasks():
    pro_layout = {k: (None, k, shape) for k, shape in expected_shapes(get_task("k5-pro-t2v-5s-sd").dit_params).items()}
    with pytest.raises(CheckpointError) as error:
        check_architecture(pro_layout, get_task("k5-lite-t2v-5s-sd"), "pro.safetensors")
    message = str(error.value)
    expected = (
        "key 'time_embeddings.in_layer.weight' has shape [1024, 4096] in the checkpoint, the task expects [512, 1792]"
    )
    assert expected in message
    pro_tasks = [n for n in matching_tasks(expected_shapes(get_task("k5-pro-t2v-5s-sd").dit_params))]
    assert pro_tasks == [n for n in pro_tasks if n.startswith("k5-pro-")] and len(pro_tasks) == 10  # 6 SFT, 4 others
    assert "fits these tasks: " + ", ".join(pro_tasks) in message
    image_layout = {k: (None, k, shape) for k, shape in expected_shapes(get_task("k5-lite-t2i-hd").dit_params).items()}
    with pytest.raises(CheckpointError, match="fits these tasks: k5-lite-t2i-hd, k5-lite-t2i-pretrain-hd\\."):
        check_architecture(image_layout, get_task("k5-lite-i2i-hd"), "t2i.safetensors")


def test_unknown_architecture_says_so(tmp_path):
    state = random_dit("tiny-t2v").state_dict()
    state["extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match="unexpected key 'extra.weight'.*No known task has this architecture"):
        load_dit(tmp_path / "odd.safetensors", get_task("tiny-t2v"))


def test_bad_paths_and_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dit(tmp_path / "missing.safetensors", get_task("tiny-t2v"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is not a .safetensors file"):
        load_dit(tmp_path / "notes.txt", get_task("tiny-t2v"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="cannot read .*broken.safetensors"):
        load_dit(tmp_path / "broken.safetensors", get_task("tiny-t2v"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="should hold one .safetensors file"):
        load_dit(empty, get_task("tiny-t2v"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="lists shard\\(s\\) that do not exist"):
        load_dit(index, get_task("tiny-t2v"))


def test_save_is_atomic_and_records_the_architecture(tmp_path):
    from safetensors import safe_open

    model = random_dit("tiny-t2i")
    save_dit(model, tmp_path / "dit.safetensors", metadata={"note": "x"})
    assert [p.name for p in tmp_path.iterdir()] == ["dit.safetensors"]  # no temporary left behind
    with safe_open(str(tmp_path / "dit.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["dit_params"])["model_dim"] == 64 and meta["note"] == "x"
