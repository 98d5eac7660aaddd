"""Build a tiny random weights tree with the layout and file formats of the real one.

    python -m kandinsky5.tiny OUT_DIR [--seed 0]

writes, deterministically from the seed:

    OUT_DIR/model/tiny_*.safetensors      DiT checkpoints of the tiny-* task presets (bf16, official keys)
    OUT_DIR/vae/                          HunyuanVideo VAE, diffusers layout (config.json + fp32 safetensors)
    OUT_DIR/flux/vae/                     FLUX.1 VAE, diffusers layout (fp32)
    OUT_DIR/text_encoder/                 Qwen2.5-VL folder: config, bf16 weights under the published key
                                          names (model.layers.*, visual.*), tokenizer, image processor
    OUT_DIR/text_encoder2/clip_l.safetensors   CLIP-L text tower, single fp16 file as ComfyUI ships it

    python -m kandinsky5.tiny OUT_DIR --comfyui

writes the same kinds of models as a ComfyUI models folder, one file each:

    OUT_DIR/diffusion_models/tiny_*.safetensors
    OUT_DIR/vae/hunyuan_video_vae_bf16.safetensors, OUT_DIR/vae/ae.safetensors (FLUX, BFL key names)
    OUT_DIR/text_encoders/qwen_2.5_vl_7b.safetensors (+ _fp8_scaled), OUT_DIR/text_encoders/clip_l.safetensors

(the tiny Qwen there covers Qwen2.5's real vocabulary, as the shipped tokenizer needs; single files
carry their tiny configuration in their metadata, where the real ones use the official one).
Every command of the toolkit runs on these trees exactly as on the real weights; the tests and the
quick-start demo use them. The Qwen tokenizer is a byte-level BPE trained here on the prompt
templates and a few sentences, with Qwen's pre-tokenizer and special tokens.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from kandinsky5.encoders.prompt_expansion import QWEN_GENERATION
from kandinsky5.encoders.prompt_templates import TEMPLATES
from kandinsky5.encoders.qwen_vocab import FIRST_SPECIAL_ID, QWEN_PRETOKENIZE, QWEN_SPECIAL_TOKENS
from kandinsky5.model.checkpoint import save_dit
from kandinsky5.model.dit import DiffusionTransformer3D
from kandinsky5.model.tasks import TASKS, TINY_CLIP_DIM, TINY_TEXT_DIM
from modules.atomic_save import save_safetensors_atomic
from modules.option_types import ScriptParser

TINY_SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS[:14]  # the tiny tokenizer's: Qwen's up to <|video_pad|>
TOKENIZER_CORPUS = [
    "A cat walks on the grass, realistic style.",
    "A red car drives along a coastal road at sunset; the camera follows it from above.",
    "Two people dance in a neon-lit street while rain falls. Close-up, slow motion.",
    "An old lighthouse on a cliff, waves crashing, 35mm film, golden hour.",
    "low quality, bad quality, artifacts, blurry, worst quality",
    "Make the sky purple and add a rainbow over the mountains.",
]
TINY_VAE_CHANNELS = [8, 8, 16, 16]
# Qwen2.5-VL-7B-Instruct's chat template (its chat_template.json), which the tiny folder carries as the real one does
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=TINY_SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [t.text for t in TEMPLATES.values()] + TOKENIZER_CORPUS
    tokenizer.train_from_iterator(corpus * 4, trainer)
    return tokenizer


def tiny_qwen_config(vocab_size: int, ids: dict[str, int], language: dict | None = None):
    """A tiny Qwen2.5-VL's configuration; ``ids``: the special tokens' ids in its tokenizer."""
    from transformers import Qwen2_5_VLConfig

    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=2 * TINY_TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    text_config.update(language or {})
    head_dim = text_config["hidden_size"] // text_config["num_attention_heads"]
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=text_config["hidden_size"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) * 2 == head_dim
    return config


QWEN_VOCAB_SIZE = 152064  # Qwen2.5-VL-7B's embedding rows (151,665 tokens, padded)


def qwen_published_state(model) -> dict[str, torch.Tensor]:
    """The state dict under the published checkpoint's names (model.layers.*, visual.*), as
    Qwen2.5-VL-7B-Instruct's shards and ComfyUI's single file hold it."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        elif key.startswith("model.visual."):
            key = "visual." + key.removeprefix("model.visual.")
        state[key] = value.contiguous()
    return state


def tiny_real_vocab_qwen(seed: int):
    """A tiny Qwen2.5-VL whose embedding covers Qwen2.5's real tokenizer (the one shipped for single files)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    ids = {token: FIRST_SPECIAL_ID + i for i, token in enumerate(QWEN_SPECIAL_TOKENS)}
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(tiny_qwen_config(QWEN_VOCAB_SIZE, ids))


def write_qwen_single_file(file: Path, seed: int, fp8_scaled: bool = False, lm_head: bool = False) -> None:
    """Qwen2.5-VL as ComfyUI's text_encoders/qwen_2.5_vl_7b[_fp8_scaled].safetensors holds it: one bf16
    file under the published names, without lm_head unless asked; fp8_scaled: the language model's Linear
    weights in float8_e4m3fn with a per-tensor ``scale_weight`` and the ``scaled_fp8`` marker. Its tiny
    configuration travels in the metadata (``config``): the real file is read with Qwen2.5-VL-7B's."""
    model = tiny_real_vocab_qwen(seed).to(torch.bfloat16)
    state = {k: v for k, v in qwen_published_state(model).items() if lm_head or not k.startswith("lm_head.")}
    if fp8_scaled:
        for key in [k for k in state if k.startswith("model.layers.") and k.endswith("_proj.weight")]:
            weight = state[key].float()
            scale = weight.abs().max() / torch.finfo(torch.float8_e4m3fn).max
            state[key] = (weight / scale).to(torch.float8_e4m3fn)
            state[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
        state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    file.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(state, file, metadata={"config": model.config.to_json_string()})


def write_qwen(folder: Path, seed: int, language: dict | None = None, dtype: torch.dtype = torch.bfloat16) -> None:
    """A Qwen2.5-VL folder with the tiny tokenizer; ``language`` overrides the tiny language-model
    sizes (benchmarks/run_all.py writes one of the real width), ``dtype`` is that of the weights."""
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    backend = build_qwen_tokenizer()
    backend.save(str(folder / "tokenizer.json"))
    ids = {token: backend.token_to_id(token) for token in TINY_SPECIAL_TOKENS}
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "padding_side": "right",
        "errors": "replace",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    assert len(PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))) == backend.get_vocab_size()

    torch.manual_seed(seed)
    config = tiny_qwen_config(backend.get_vocab_size(), ids, language)
    model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    model.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=256 * 256).save_pretrained(folder)
    processor_config = {"processor_class": "Qwen2_5_VLProcessor"}
    (folder / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    # What the real folder carries for writing text: its chat template and generation settings.
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}, indent=2))
    end, stop = ids["<|endoftext|>"], ids["<|im_end|>"]
    generation = {**QWEN_GENERATION, "bos_token_id": end, "pad_token_id": end, "eos_token_id": [stop, end]}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


def write_clip(file: Path, seed: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    from kandinsky5.encoders.clip_vocab import clip_vocab_and_merges

    torch.manual_seed(seed)
    vocab, _ = clip_vocab_and_merges()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TINY_CLIP_DIM,
        intermediate_size=2 * TINY_CLIP_DIM,
        num_hidden_layers=2,
        num_attention_heads=1,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    model = CLIPTextModel(config)
    # keyed as ComfyUI's clip_l.safetensors is: text_model.<module path>
    # fp16, as ComfyUI's file holds it
    state = {f"text_model.{k.removeprefix('text_model.')}": v.half() for k, v in model.state_dict().items()}
    save_safetensors_atomic(state, file)


def write_vae(folder: Path, kind: str, seed: int) -> None:
    from diffusers import AutoencoderKL, AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    shared = dict(block_out_channels=TINY_VAE_CHANNELS, layers_per_block=1, norm_num_groups=4, latent_channels=16)
    if kind == "hunyuan":
        model = AutoencoderKLHunyuanVideo(**shared)
    else:
        model = AutoencoderKL(
            **shared,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            sample_size=64,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    model.save_pretrained(folder)


def _flux_to_bfl(key: str, blocks: int) -> str:
    """A diffusers AutoencoderKL key under Black Forest Labs' ae.safetensors name."""
    key = key.replace(".conv_norm_out.", ".norm_out.").replace(".conv_shortcut.", ".nin_shortcut.")
    key = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = key.replace(".mid_block.attentions.0.group_norm.", ".mid.attn_1.norm.")
    for ours, theirs in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        key = key.replace(f".mid_block.attentions.0.{ours}.", f".mid.attn_1.{theirs}.")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    # the decoder's up blocks run in the other order
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.", key)
    return key.replace(".resnets.", ".block.").replace(".upsamplers.0.", ".upsample.")


def write_comfy_vae(file: Path, kind: str, seed: int) -> None:
    """The VAE as one bf16 file, as ComfyUI's models/vae/ holds it: hunyuan_video_vae_bf16.safetensors
    (the HunyuanVideo key names) or ae.safetensors (FLUX in Black Forest Labs' key names, attention
    projections as 1x1 convolutions). The tiny configuration travels in the metadata."""
    from diffusers import AutoencoderKL, AutoencoderKLHunyuanVideo

    folder = file.parent / f".{file.stem}_diffusers"
    write_vae(folder, kind, seed)
    model = (AutoencoderKL if kind == "flux" else AutoencoderKLHunyuanVideo).from_pretrained(folder)
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if kind == "flux":
        blocks = len(config["block_out_channels"])
        state = {
            _flux_to_bfl(k, blocks): v[:, :, None, None] if ".attentions.0.to_" in k and k.endswith(".weight") else v
            for k, v in state.items()
        }
    save_safetensors_atomic(state, file, metadata={"config": json.dumps(config)})
    for leftover in sorted(folder.rglob("*"), reverse=True):
        leftover.unlink() if leftover.is_file() else leftover.rmdir()
    folder.rmdir()


def write_dits(folder: Path, seed: int) -> list[Path]:
    written = []
    for i, task in enumerate(t for t in TASKS.values() if t.name.startswith("tiny-")):
        path = folder / task.checkpoint
        if path in written:
            continue  # several tiny tasks share an architecture and a file, as the real ones do
        torch.manual_seed(seed + 100 + i)
        model = DiffusionTransformer3D(**task.dit_params).set_compute_dtype(torch.bfloat16)
        save_dit(model, path)
        written.append(path)
    return written


COMFY_FILES = {
    "hunyuan_vae": "vae/hunyuan_video_vae_bf16.safetensors",
    "flux_vae": "vae/ae.safetensors",
    "qwen": "text_encoders/qwen_2.5_vl_7b.safetensors",
    "qwen_fp8": "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
    "clip": "text_encoders/clip_l.safetensors",
}


def build_comfy_tree(out: str | Path, seed: int = 0) -> Path:
    """A tiny ComfyUI models folder: diffusion_models/ (the DiTs under their own names), vae/ and
    text_encoders/ with the file names and key layouts of ComfyUI's downloads."""
    out = Path(out)
    write_dits(out / "diffusion_models", seed)
    write_comfy_vae(out / COMFY_FILES["hunyuan_vae"], "hunyuan", seed + 1)
    write_comfy_vae(out / COMFY_FILES["flux_vae"], "flux", seed + 2)
    write_qwen_single_file(out / COMFY_FILES["qwen"], seed + 3)
    write_qwen_single_file(out / COMFY_FILES["qwen_fp8"], seed + 3, fp8_scaled=True)
    write_clip(out / COMFY_FILES["clip"], seed + 4)
    return out


def build_tiny_tree(out: str | Path, seed: int = 0) -> Path:
    out = Path(out)
    write_dits(out / "model", seed)
    write_vae(out / "vae", "hunyuan", seed + 1)
    write_vae(out / "flux" / "vae", "flux", seed + 2)
    write_qwen(out / "text_encoder", seed + 3)
    (out / "text_encoder2").mkdir(parents=True, exist_ok=True)
    write_clip(out / "text_encoder2" / "clip_l.safetensors", seed + 4)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write the tree into (created if needed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--comfyui",
        action="store_true",
        help="write a ComfyUI models folder instead: diffusion_models/, vae/, text_encoders/ (single files)",
    )
    args = parser.parse_args(argv)
    out = (build_comfy_tree if args.comfyui else build_tiny_tree)(args.out_dir, args.seed)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files ({size / 2**20:.1f} MiB) under {out}")


if __name__ == "__main__":
    main()
