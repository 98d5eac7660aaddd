"""The spec's command lines (spec/kandinsky5.md), as a user types them, on the tiny tree.

The commands and the dataset config below are the spec's, word for word; tests/acceptance.py changes
only paths, task names and sizes, and says what else it had to change (a GPU-only attention flag,
the 8-bit optimizer where bitsandbytes is missing). They run in the spec's order, each on what the
one before wrote: text caching, latent caching, bf16 training through accelerate with fp8 and
block swap, generation with the trained LoRA, the fp8 converter, and generation from its output.
"""

import av
import pytest
from safetensors import safe_open

from .acceptance import SPEC_DATASET, check, make_workspace, run, split_commands, tiny_command

SPEC_COMMANDS = {
    "cache_text": """
python kandinsky5_cache_text_encoder_outputs.py \\
    --dataset_config path/to/dataset.toml \\
    --text_encoder_qwen path/to/text_encoder \\
    --text_encoder_clip path/to/text_encoder2 \\
    --batch_size 4
""",
    "cache_latents": """
python kandinsky5_cache_latents.py \\
    --dataset_config path/to/dataset.toml \\
    --vae path/to/vae/diffusion_pytorch_model.safetensors
""",
    "train": """
accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 \\
    kandinsky5_train_network.py \\
    --mixed_precision bf16 \\
    --dataset_config path/to/dataset.toml \\
    --task k5-pro-t2v-5s-sd \\
    --dit path/to/kandinsky5pro_t2v_pretrain_5s.safetensors \\
    --text_encoder_qwen path/to/text_encoder \\
    --text_encoder_clip path/to/text_encoder2 \\
    --vae path/to/vae/diffusion_pytorch_model.safetensors \\
    --fp8_base \\
    --blocks_to_swap 10 \\
    --flash_attn \\
    --gradient_checkpointing \\
    --max_data_loader_n_workers 1 \\
    --persistent_data_loader_workers \\
    --learning_rate 1e-4 \\
    --optimizer_type AdamW8Bit \\
    --optimizer_args "weight_decay=0.001" "betas=(0.9,0.95)" \\
    --max_grad_norm 1.0 \\
    --lr_scheduler constant_with_warmup \\
    --lr_warmup_steps 100 \\
    --network_module networks.lora_kandinsky \\
    --network_dim 16 \\
    --network_alpha 16 \\
    --timestep_sampling shift \\
    --discrete_flow_shift 5.0 \\
    --output_dir path/to/output \\
    --output_name my_lora \\
    --save_every_n_epochs 5 \\
    --max_train_epochs 50 \\
    --scheduler_scale 10.0
""",
    "generate": """
python kandinsky5_generate_video.py \\
    --task k5-pro-t2v-5s-sd \\
    --dit path/to/kandinsky5pro_t2v_pretrain_5s.safetensors \\
    --vae path/to/vae/diffusion_pytorch_model.safetensors \\
    --text_encoder_qwen path/to/text_encoder \\
    --text_encoder_clip path/to/text_encoder2 \\
    --blocks_to_swap 10 \\
    --offload_dit_during_sampling \\
    --fp8_base \\
    --dtype bfloat16 \\
    --prompt "A cat walks on the grass, realistic style." \\
    --negative_prompt "low quality, artifacts" \\
    --frames 17 \\
    --steps 50 \\
    --guidance 5 \\
    --scheduler_scale 10 \\
    --seed 42 \\
    --width 512 \\
    --height 512 \\
    --output path/to/output.mp4 \\
    --lora_weight path/to/lora.safetensors \\
    --lora_multiplier 1.0
""",
    "make_fp8": """
python _make_fp8_ckpt.py \\
    --input path/to/kandinsky5pro_t2v_sft_5s.safetensors \\
    --output path/to/kandinsky5pro_t2v_sft_5s_fp8.safetensors
""",
}


@pytest.fixture(scope="module")
def spec_workspace(tiny_tree, tmp_path_factory):
    folder = make_workspace(tiny_tree, tmp_path_factory.mktemp("spec"))
    config = SPEC_DATASET.replace("[512, 512]", "[64, 64]").replace("[256, 256]", "[64, 48]")
    config = config.replace("target_frames = [17]", "target_frames = [9]").replace("path/to/", f"{folder}/data/")
    (folder / "dataset.toml").write_text(config)
    weights = folder / "weights"
    paths = {
        "path/to/dataset.toml": str(folder / "dataset.toml"),
        "path/to/text_encoder": str(weights / "text_encoder"),
        "path/to/text_encoder2": str(weights / "text_encoder2"),
        "path/to/vae/diffusion_pytorch_model.safetensors": str(weights / "vae" / "diffusion_pytorch_model.safetensors"),
        "path/to/output": str(folder / "output"),
        "path/to/output.mp4": str(folder / "output.mp4"),
        "path/to/lora.safetensors": str(folder / "output" / "my_lora.safetensors"),
        "path/to/kandinsky5pro_t2v_sft_5s_fp8.safetensors": str(folder / "pro_fp8.safetensors"),
    }
    return folder, paths


def run_spec(name: str, spec_workspace) -> tuple:
    folder, paths = spec_workspace
    (text,) = split_commands(SPEC_COMMANDS[name])
    command = tiny_command(text, folder, paths)
    result = run(command.argv, folder)
    check(result, text)
    return folder, command, result


# The commands depend on each other's files: pytest runs them in this file's order.
def test_spec_text_caching(spec_workspace):
    folder, _, _ = run_spec("cache_text", spec_workspace)
    assert len(list((folder / "data" / "images" / "cache").glob("*.safetensors"))) == 2
    assert len(list((folder / "data" / "videos" / "cache").glob("*.safetensors"))) == 1


def test_spec_latent_caching(spec_workspace):
    folder, _, _ = run_spec("cache_latents", spec_workspace)
    assert len(list((folder / "data" / "images" / "cache").glob("*.safetensors"))) == 4
    assert len(list((folder / "data" / "videos" / "cache").glob("*.safetensors"))) == 2


def test_spec_training_in_bf16_through_accelerate(spec_workspace):
    folder, command, result = run_spec("train", spec_workspace)
    assert [c.split(":")[0] for c in command.changes][0] == "--flash_attn -> --sdpa"
    output = folder / "output"
    assert (output / "my_lora.safetensors").is_file()
    assert (output / "my_lora-000001.safetensors").is_file()  # --save_every_n_epochs (made 1 of 2)
    with safe_open(str(output / "my_lora.safetensors"), "pt") as f:
        metadata = f.metadata()
        assert metadata["ss_mixed_precision"] == "bf16"
        assert any(key.endswith("lora_down.weight") for key in f.keys())
    assert "block swap" in result.stdout


def test_spec_generation_with_the_lora(spec_workspace):
    folder, _, _ = run_spec("generate", spec_workspace)
    with av.open(str(folder / "output.mp4")) as video:
        frames = [f for f in video.decode(video=0)]
    assert len(frames) == 9 and (frames[0].width, frames[0].height) == (64, 64)


def test_spec_fp8_converter_and_its_checkpoint_used_as_is(spec_workspace):
    folder, paths = spec_workspace
    run_spec("make_fp8", spec_workspace)
    fp8 = folder / "pro_fp8.safetensors"
    with safe_open(str(fp8), "pt") as f:
        assert any(key.endswith(".scale_weight") for key in f.keys())
    (text,) = split_commands(SPEC_COMMANDS["generate"])
    text = text.replace("path/to/kandinsky5pro_t2v_pretrain_5s.safetensors", str(fp8)).replace(" --fp8_base", "")
    command = tiny_command(text.replace("path/to/output.mp4", str(folder / "from_fp8.mp4")), folder, paths)
    check(run(command.argv, folder), text)
    assert (folder / "from_fp8.mp4").stat().st_size > 0
