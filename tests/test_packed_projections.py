import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from kandinsky5.model.checkpoint import load_dit, save_dit
from kandinsky5.model.tasks import get_task
from networks.lora_kandinsky import create_network

from .dit_helpers import random_dit, random_inputs

TASK = "tiny-pro-t2v"


class CountLinear(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is F.linear
        return func(*args, **(kwargs or {}))


def forward_counting(model, inputs):
    with torch.no_grad(), CountLinear() as counter:
        out = model(*inputs)
    return out, counter.calls


def saved_and_loaded(tmp_path, seed=0):
    reference = random_dit(TASK, seed)
    save_dit(reference, tmp_path / "dit.safetensors")
    return reference, load_dit(tmp_path / "dit.safetensors", get_task(TASK), dtype=torch.float32)


def test_a_loaded_dit_projects_q_k_v_in_one_matmul_with_the_same_result(tmp_path):
    reference, loaded = saved_and_loaded(tmp_path)
    inputs = random_inputs(reference, 2, 2, 4, 6, 5)
    expected, separate_calls = forward_counting(reference, inputs)
    out, packed_calls = forward_counting(loaded, inputs)
    text_blocks, visual_blocks = len(loaded.text_transformer_blocks), len(loaded.visual_transformer_blocks)
    # q, k, v -> 1 matmul in every self-attention; k, v -> 1 in every cross-attention
    assert separate_calls - packed_calls == 2 * text_blocks + 3 * visual_blocks
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_packing_keeps_names_and_shapes_and_a_packed_model_saves_and_reloads(tmp_path):
    reference, loaded = saved_and_loaded(tmp_path)
    shapes = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in loaded.state_dict().items()} == shapes
    save_dit(loaded, tmp_path / "again.safetensors")
    again = load_dit(tmp_path / "again.safetensors", get_task(TASK), dtype=torch.float32)
    inputs = random_inputs(reference, 1, 2, 4, 6, 5)
    assert torch.equal(forward_counting(again, inputs)[0], forward_counting(loaded, inputs)[0])


def test_a_lora_or_a_moved_weight_runs_the_layers_one_by_one(tmp_path):
    reference, loaded = saved_and_loaded(tmp_path)
    inputs = random_inputs(reference, 1, 2, 4, 6, 5)
    networks = []
    for model in (reference, loaded):
        torch.manual_seed(3)
        network = create_network(model, 4, 4)
        for lora in network.loras.values():
            torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
        network.apply_to(model)
        networks.append(network)
    expected, separate_calls = forward_counting(reference, inputs)
    out, lora_calls = forward_counting(loaded, inputs)
    assert lora_calls == separate_calls  # every targeted layer goes through its LoRA branch
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)

    _, fresh = saved_and_loaded(tmp_path)
    attention = fresh.visual_transformer_blocks[0].self_attention
    attention.to_key.weight.data = attention.to_key.weight.data.clone()  # no longer beside q and v
    _, calls = forward_counting(fresh, inputs)
    _, packed_calls = forward_counting(saved_and_loaded(tmp_path)[1], inputs)
    assert calls == packed_calls + 2  # that block's q, k, v run apart (its cross-attention stays packed)


def test_under_autograd_each_packed_output_is_a_tensor_of_its_own(tmp_path):
    # attention keeps v for its backward: as a view of the packed result it would keep q and k too
    from kandinsky5.model.packed_projections import packed_outputs

    _, loaded = saved_and_loaded(tmp_path)
    attention = loaded.visual_transformer_blocks[0].self_attention
    layers = (attention.to_query, attention.to_key, attention.to_value)
    x = torch.randn(1, 5, layers[0].in_features)
    with torch.no_grad():
        views = packed_outputs(layers, x)
    assert len({t.untyped_storage().data_ptr() for t in views}) == 1  # inference: one result, split
    separate = packed_outputs(layers, x.requires_grad_(True))
    assert len({t.untyped_storage().data_ptr() for t in separate}) == 3
    for view, own in zip(views, separate, strict=True):
        assert torch.equal(view, own) and own.requires_grad
        assert own.untyped_storage().nbytes() == own.numel() * own.element_size()
